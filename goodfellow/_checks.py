"""Checks shared by the public entry points: run once where a user's input comes in.

The formulas elsewhere in the package trust their arguments; every refusal a user can meet is
written here once, with a message that says what is wrong and how to fix it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from goodfellow.records import LayerRecord

LossFunction = Callable[[Tensor, Tensor], Tensor]


def display_name(name: str) -> str:
    """A module's qualified name for messages (the root module has the empty name)."""
    return f"'{name}'" if name else "the model itself"


def describe(name: str, module: object) -> str:
    """``Linear 'fc1'`` for messages, or ``the model itself (Linear)`` for the root module."""
    kind = type(module).__name__
    return f"{kind} '{name}'" if name else f"the model itself ({kind})"


def display_module(name: str) -> str:
    """``module 'fc1'`` for messages, or ``the model itself`` for the root module."""
    return f"module '{name}'" if name else "the model itself"


def model_output(output: Tensor | tuple) -> Tensor:
    """The prediction of a model that may return ``(y, activations, linear_combs)``."""
    return output[0] if isinstance(output, tuple) else output


def check_model_batch(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a scalar.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets hold different numbers of examples: {inputs.shape[0]} and "
            f"{targets.shape[0]}."
        )
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0): per-example gradients need an example.")


def check_plain_mean(loss_fn: LossFunction, targets: Tensor) -> None:
    r"""Refuse class-index losses whose ``"mean"`` is not :math:`\frac1n \sum_i L_i`.

    With class weights :math:`w` a cross-entropy or NLL ``"mean"`` divides by
    :math:`\sum_i w_{y_i}`, and with ignored targets by the number of the others; an example's
    own loss is normalized by its own weight or count, so the factor :math:`n` would be wrong.
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return
    if targets.is_floating_point():
        return  # class probabilities: their mean divides by the number of examples
    if loss_fn.weight is not None:
        why = "has class weights, so its mean divides by the sum of the targets' weights"
    elif targets.device.type != "meta" and (targets == loss_fn.ignore_index).any():
        why = (
            f"ignores targets equal to ignore_index={loss_fn.ignore_index}, so its mean "
            "divides by the number of the other targets"
        )
    else:
        return
    raise ValueError(
        f"loss_fn {why}, not by the number of examples n: the per-example gradients cannot be "
        "recovered from it. Use the same loss with reduction='sum' (and divide the result by "
        "what the mean divides by, if that is what you want)."
    )


def check_trainable(model: nn.Module, trainable: Sequence) -> None:
    if not trainable:
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameter with requires_grad=True, so "
            "there is no gradient to compute; unfreeze the parameters (requires_grad_(True))."
        )


def check_feature_tensor(t: object, name: str) -> None:
    """Refuse ``t`` unless it is a floating-point ``(n, ..., features)`` tensor.

    What a layer's recorded input or output gradient must be, wherever a user passes one
    (:func:`goodfellow.linear_factors`, :func:`goodfellow.kfac_factors`, ...).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {t.dtype}: convert it with .float() "
            "or .double()."
        )
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (n, ..., features), got shape {tuple(t.shape)}.")


def check_same_kind(
    x: Tensor, x_name: str, y: Tensor, y_name: str,
    fix: str = "cast both to one dtype on one device",
) -> None:
    """Refuse two tensors of different dtypes or devices, which one product needs alike."""
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"{x_name} is {x.dtype} on {x.device} but {y_name} is {y.dtype} on {y.device}; {fix}."
        )


# ---------------------------------------------------------------------------------------------
# Modules PerExampleGradients cannot record


def refuse_uninitialized(name: str, module: nn.Module, own: dict[str, nn.Parameter]) -> None:
    """A lazy module's parameters have no shape before its first forward."""
    for p_name, param in own.items():
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{display_module(name)} ({type(module).__name__}) has the uninitialized "
                f"parameter {p_name!r}; run one forward of the lazy model before recording."
            )


def refuse_training_batchnorm(name: str, module: _BatchNorm) -> None:
    """BatchNorm in training mode mixes the examples of a batch: refuse it."""
    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    if module.training or trainable:
        why = (
            "in training mode it normalizes with statistics of the whole batch, so every "
            "example's output depends on every other example and per-example gradients are "
            "undefined"
            if module.training
            else "its parameters are trainable, and PerExampleGradients has no rule for "
            "BatchNorm"
        )
        raise ValueError(
            f"{display_module(name)} ({type(module).__name__}) cannot be recorded: {why}. "
            "Use GroupNorm or LayerNorm without trainable parameters, or put the BatchNorm in "
            "eval mode with frozen parameters."
        )


def check_call_batch(
    record: LayerRecord,
    module: nn.Module,
    a: Tensor,
    model_batch_size: int | None,
    batch_size: int | None,
) -> int:
    """The number of examples ``n`` of one recorded call; refuse a call that hides the batch.

    Args:
        record: The module's record (its name, rule and batch dimension).
        module: The module that ran.
        a: The call's input.
        model_batch_size: The batch size of the model's own input in the forward running now
            (``None`` for a submodule run on its own).
        batch_size: The batch size of the batch's earlier calls, ``None`` for its first.

    Returns:
        ``a.shape[record.batch_dim]``.

    Raises:
        ValueError: If ``a`` has no batch dimension, or its batch size differs from the model
            input's or from the earlier calls'.
    """
    if a.dim() < record.rule.min_input_dim(module):
        raise ValueError(
            f"{describe(record.name, module)} got an input of shape {tuple(a.shape)} "
            "with no batch dimension; per-example gradients need the examples on "
            "dimension 0 (for a Linear, inputs of shape (n, ..., in_features))."
        )
    n = a.shape[record.batch_dim]
    if model_batch_size is not None and n != model_batch_size:
        sequence_first = record.batch_dim == 0 and a.dim() > 2 and a.shape[1] == model_batch_size
        raise ValueError(
            f"{describe(record.name, module)} got {n} examples on dimension "
            f"{record.batch_dim} (input of shape {tuple(a.shape)}), but the model's "
            f"input has {model_batch_size}: "
            + (
                "the batch is on dimension 1, a sequence-first (T, n, d) layout, which the "
                "rules of this layer do not read; run the model batch-first (batch_first=True "
                "for nn.TransformerEncoderLayer and nn.MultiheadAttention) to keep the batch "
                "on dimension 0."
                if sequence_first
                else "the module runs on a tensor without the batch dimension (a position "
                "embedding looked up on arange(T) and broadcast over the batch) or with the "
                "batch merged into another dimension (a reshape of (n, T, d) to (n * T, d)), "
                "which hides each example's share from its hooks. Expand positions to (n, T) "
                "(positions.expand(n, T)) and keep the batch as its own dimension."
            )
        )
    if batch_size is not None and n != batch_size:
        raise ValueError(
            f"{describe(record.name, module)} got {n} examples on dimension 0, but "
            f"earlier calls of this batch got {batch_size}. Every Linear must see "
            "the batch on dimension 0 (batch-first layouts only), and all forwards "
            "before a backward belong to one batch: run evaluation under "
            "torch.no_grad(), or call clear() to discard forwards without a backward."
        )
    return n


# ---------------------------------------------------------------------------------------------
# Numbers: a NumPy scalar (np.float32(0.1), np.int64(4)) is as good as a Python number.


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: Python's or NumPy's, but not a ``bool``.

    ``numbers.Real`` covers ``int``, ``float`` and NumPy's floating and integer scalars (NumPy
    registers them); ``bool`` is an ``int`` to Python but never meant as a number here, and
    NumPy's ``bool_`` is not registered at all. Tensors are not numbers.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer, Python's or NumPy's (``np.int64``), but not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(value: object, name: str, expected: str = "a number") -> float:
    """``value`` as a Python ``float``; ``TypeError`` unless it is a real number.

    Args:
        value: What the user passed.
        name: The argument's name, for the message.
        expected: What the message says it must be (``"a positive number"``).

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number (a ``bool``, a string, a tensor, ...).
    """
    if not is_real(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}.")
    return float(value)


def integer_number(value: object, name: str, expected: str = "an integer") -> int:
    """``value`` as a Python ``int``; ``TypeError`` unless it is an integer (not a ``bool``).

    Args:
        value: What the user passed.
        name: The argument's name, for the message.
        expected: What the message says it must be (``"a positive integer"``).

    Returns:
        ``int(value)``.

    Raises:
        TypeError: If ``value`` is not an integer (a float, even ``4.0``, counts as not).
    """
    if not is_integer(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}.")
    return int(value)


# ---------------------------------------------------------------------------------------------
# The reduction a torch loss module carries


def loss_reduction_of(loss_fn: object, loss_reduction: str | None) -> str:
    r"""The reduction of ``loss_fn`` over the batch, ``"sum"`` or ``"mean"``.

    ``nn.KLDivLoss(reduction="batchmean")`` divides the summed loss by the batch size ``n``:
    that is :math:`\frac1n \sum_i L_i` with :math:`L_i` the loss of example ``i`` alone, the
    package's ``"mean"`` (its own ``"mean"`` divides by every element, and an example alone is
    divided by its elements the same way, so it is ``"mean"`` too).

    Args:
        loss_fn: The loss; a torch loss module carries ``.reduction``.
        loss_reduction: What the user passed, or ``None`` to read it off ``loss_fn``.

    Returns:
        The reduction, with ``"batchmean"`` read as ``"mean"`` (other values are returned as
        they are, for :func:`goodfellow.batch_size_factor` to refuse).

    Raises:
        TypeError: If ``loss_reduction`` is ``None`` and ``loss_fn`` carries no reduction.
        ValueError: If ``loss_reduction`` contradicts ``loss_fn.reduction``.
    """
    carried = getattr(loss_fn, "reduction", None)
    carried = "mean" if carried == "batchmean" else carried
    given = "mean" if loss_reduction == "batchmean" else loss_reduction
    if given is None:
        if carried is None:
            raise TypeError(
                "cannot tell how loss_fn reduces over the batch: pass loss_reduction='sum' or "
                "'mean' (or use a torch loss module, which carries .reduction)."
            )
        return carried
    if carried is not None and carried != given:
        raise ValueError(
            f"loss_reduction={loss_reduction!r} contradicts loss_fn.reduction="
            f"{loss_fn.reduction!r}, and the gradients would be scaled by the wrong factor: "
            "drop loss_reduction (it is read off the loss) or make the two agree."
        )
    return given
