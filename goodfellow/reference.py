r"""The two references every per-example gradient of the package is tested against.

* The **naive loop**: one forward and one backward per example, ``torch.autograd.grad`` of
  :math:`L_i` alone. Obviously right, ``n`` times slower.
* **torch.func**: ``vmap(grad(loss_of_one))``, the model applied to one example at a time inside
  a vectorizing transform. Right for every model that treats examples independently.

Neither knows any layer formula, which is what makes them references.
:func:`check_per_example_gradients` compares :class:`goodfellow.PerExampleGradients` with the
second on a user's own model and batch: the check for what the recorder cannot detect by itself,
a model or a loss that mixes the examples of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "PerExampleGradientCheck",
    "check_per_example_gradients",
    "naive_per_example_grads",
    "torch_func_per_example_grads",
]

from goodfellow._checks import (
    LossFunction,
    check_model_batch,
    check_plain_mean,
    check_trainable,
    loss_reduction_of,
    model_output,
    real_number,
)


def naive_per_example_grads(
    model: nn.Module, loss_fn: LossFunction, inputs: Tensor, targets: Tensor
) -> list[Tensor]:
    """The reference: one forward and one backward per example.

    Example ``i`` is run alone, as a batch of one, and its loss
    ``L_i = loss_fn(model(inputs[i:i+1]), targets[i:i+1])`` is differentiated with
    ``torch.autograd.grad``. Slow (``n`` backward passes) but obviously right.

    Args:
        model: Any module; if it returns a tuple (like :class:`goodfellow.MLP`) its first entry is
            the prediction.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        inputs: Batch of inputs, shape ``(n, ...)``.
        targets: Batch of targets, shape ``(n, ...)``.

    Returns:
        One tensor per parameter with ``requires_grad``, in the order of
        ``model.parameters()``, of shape ``(n, *param.shape)``.

    Raises:
        TypeError: If ``model`` is not a module or the batch not tensors.
        ValueError: If the batch is empty, inputs and targets hold different numbers of
            examples, or no parameter requires grad.
    """
    check_model_batch(model, inputs, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    check_trainable(model, params)
    per_example: list[tuple[Tensor, ...]] = []
    for i in range(inputs.shape[0]):
        prediction = model_output(model(inputs[i : i + 1]))
        loss_i = loss_fn(prediction, targets[i : i + 1])
        per_example.append(torch.autograd.grad(loss_i, params))
    return [torch.stack(column) for column in zip(*per_example)]


def torch_func_per_example_grads(
    model: nn.Module, loss_fn: LossFunction, inputs: Tensor, targets: Tensor
) -> list[Tensor]:
    """The ``torch.func`` reference: ``vmap`` over examples of ``grad`` of one example's loss.

    Random operations in the forward (``nn.Dropout`` in training mode) are refused rather than
    given one of ``vmap``'s randomness modes: ``randomness="same"`` would give every example
    the same mask, and ``"different"`` masks that match the naive loop or a batch forward in
    distribution only, so neither gives numbers anything can be compared with, which is all a
    reference is for. Put the model in eval mode (``model.eval()``) first.

    Not a reference for second derivatives: in torch 2.13, ``grad`` of a function of
    ``vmap(grad(...))`` (a gradient penalty) is wrong through ``nn.LayerNorm`` for the
    parameters before it (it differs from ``grad`` of the same penalty summed over a loop of
    ``grad``), so the tests check second derivatives against the naive loop.

    Args:
        model: Any module without batch-coupled state and without random operations; a tuple
            output's first entry is the prediction.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, applied to a batch of one.
        inputs: Batch of inputs, shape ``(n, ...)``.
        targets: Batch of targets, shape ``(n, ...)``.

    Returns:
        One tensor per parameter with ``requires_grad``, in the order of
        ``model.parameters()``, of shape ``(n, *param.shape)``.

    Raises:
        TypeError: If ``model`` is not a module or the batch not tensors.
        ValueError: If the batch is empty, inputs and targets hold different numbers of
            examples, no parameter requires grad, or the forward draws random numbers (such
            as ``nn.Dropout`` in training mode).
    """
    check_model_batch(model, inputs, targets)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    check_trainable(model, names)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss_of_one(params: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        prediction = model_output(functional_call(model, params, (x.unsqueeze(0),)))
        return loss_fn(prediction, target.unsqueeze(0))

    try:
        grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    except RuntimeError as error:
        if "randomness" not in str(error):
            raise
        dropout = [
            name or "the model itself"
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.training
        ]
        where = f" (Dropout in training mode: {dropout})" if dropout else ""
        raise ValueError(
            f"the model's forward draws random numbers{where}: per-example gradients with "
            "random masks have no reference value to compare with (each example would get a "
            "mask of its own, equal to the naive loop's in distribution only). Put the model "
            "in eval mode (model.eval()) to compute or check per-example gradients."
        ) from error
    return [grads[name] for name in names]


_DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-10),
    torch.float32: (1e-4, 1e-6),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (1e-2, 1e-4),
}
"""``(rtol, atol)`` by dtype: round-off of the two routes' different orders of summation."""


@dataclass(frozen=True)
class PerExampleGradientCheck:
    """What :func:`check_per_example_gradients` found.

    True in a boolean context exactly when every parameter agreed.
    """

    #: Per parameter name (as in ``model.named_parameters()``), the largest absolute difference
    #: between the recorded and the ``torch.func`` per-example gradients, over examples and
    #: entries.
    max_abs_errors: dict[str, float]
    #: The names of the parameters whose difference exceeds ``atol + rtol * |reference|``
    #: somewhere, in the order of the model's parameters.
    disagreeing: list[str]
    #: The relative tolerance used.
    rtol: float
    #: The absolute tolerance used.
    atol: float

    @property
    def agrees(self) -> bool:
        """Whether every parameter's per-example gradients agreed within the tolerances."""
        return not self.disagreeing

    def __bool__(self) -> bool:
        return self.agrees

    def __str__(self) -> str:
        if self.agrees:
            worst = max(self.max_abs_errors.values(), default=0.0)
            return (
                f"the per-example gradients of all {len(self.max_abs_errors)} parameters agree "
                f"with torch.func (largest absolute error {worst:.3g})."
            )
        listed = ", ".join(
            f"{name!r} (max abs error {self.max_abs_errors[name]:.3g})" for name in self.disagreeing
        )
        return (
            f"the per-example gradients of {len(self.disagreeing)} of "
            f"{len(self.max_abs_errors)} parameters disagree with torch.func: {listed}. The "
            "model or the loss most likely mixes the examples of a batch (batch statistics such "
            "as h - h.mean(0), BatchNorm in training mode, a loss over pairs of examples): "
            "then per-example gradients are not defined by one backward of the batch."
        )


def check_per_example_gradients(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_reduction: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_mismatch: bool = False,
) -> PerExampleGradientCheck:
    r"""Check :class:`goodfellow.PerExampleGradients` on your model and batch against torch.func.

    The recorder derives each example's gradient from one forward and one backward of the
    whole batch, assuming example ``i``'s loss depends on example ``i`` alone. A model or a
    loss that mixes the examples breaks that assumption without any sign the recorder can see:
    ``h - h.mean(0)`` inside ``forward``, ``F.batch_norm(..., training=True)``, a loss over pairs
    of examples. Then the gradient of the batch loss w.r.t. a layer's output is no longer the
    sum of the examples' own, and the recorded "per-example gradients" are wrong. Run this once
    on a new model (and a batch like the training ones) before trusting the recorder with it.

    It records the batch with the hooks (``torch.autograd.grad``, so ``.grad`` is left alone)
    and computes ``vmap(grad(...))`` of each example's loss alone
    (:func:`torch_func_per_example_grads`), where mixing is impossible: a mismatch names the
    parameters the mixing reaches.

    Args:
        model: A model :class:`goodfellow.PerExampleGradients` can record (every trainable
            parameter in a module with a rule, or in one the ``torch.func`` fallback rule
            takes), in the mode it is trained in but without random operations
            (``model.eval()`` for Dropout).
        loss_fn: ``loss_fn(prediction, targets) -> scalar`` over the batch; applied to a batch
            of one for the reference.
        inputs: A batch of inputs, shape ``(n, ...)``.
        targets: Its targets, shape ``(n, ...)``.
        loss_reduction: ``"sum"`` or ``"mean"``; by default read off ``loss_fn.reduction``
            (needed for a plain function).
        rtol: Relative tolerance; by default ``1e-7`` in float64, ``1e-4`` in float32.
        atol: Absolute tolerance; by default ``1e-10`` in float64, ``1e-6`` in float32.
        raise_on_mismatch: Raise ``ValueError`` (naming the parameters) instead of returning a
            result that disagrees.

    Returns:
        A :class:`PerExampleGradientCheck`: the largest absolute error of every parameter and
        the names of those that disagree; ``bool(result)`` is whether all agree, and
        ``str(result)`` says it in words.

    Raises:
        TypeError: If the model, batch or tolerances have the wrong type, or the reduction
            cannot be read off ``loss_fn``.
        ValueError: If the recorder cannot record the model, the forward is random, the
            reduction is unknown, or (with ``raise_on_mismatch``) a parameter disagrees.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> bool(check_per_example_gradients(model, torch.nn.MSELoss(), x, y))
        True
    """
    from goodfellow.hooks import PerExampleGradients  # the hooks build on this module's peers

    check_model_batch(model, inputs, targets)
    loss_reduction = loss_reduction_of(loss_fn, loss_reduction)
    if loss_reduction == "mean":
        check_plain_mean(loss_fn, targets)
    tolerances = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            value = real_number(value, name, "a non-negative number")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative finite number, got {value}.")
        tolerances.append(value)
    rtol, atol = tolerances
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    check_trainable(model, trainable)
    with PerExampleGradients(model, loss_reduction=loss_reduction) as recorder:
        loss = loss_fn(model_output(model(inputs)), targets)
        torch.autograd.grad(loss, [p for _, p in trainable])
        recorded = {name: g.detach() for name, g in recorder.grads.items()}
    reference = dict(
        zip(
            [name for name, _ in trainable],
            torch_func_per_example_grads(model, loss_fn, inputs, targets),
        )
    )
    dtype = next(iter(recorded.values())).dtype if recorded else inputs.dtype
    default_rtol, default_atol = _DEFAULT_TOLERANCES.get(dtype, _DEFAULT_TOLERANCES[torch.float32])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    errors: dict[str, float] = {}
    disagreeing: list[str] = []
    for name, _ in trainable:
        if name not in recorded:
            continue  # the recorder refuses models with parameters it does not cover
        got, want = recorded[name], reference[name].to(recorded[name].dtype)
        difference = (got - want).abs()  # (n, *param.shape)
        errors[name] = float(difference.max()) if difference.numel() else 0.0
        if bool((difference > atol + rtol * want.abs()).any()) or not bool(
            torch.isfinite(got).all()
        ):
            disagreeing.append(name)
    result = PerExampleGradientCheck(errors, disagreeing, rtol, atol)
    if raise_on_mismatch and not result:
        raise ValueError(str(result))
    return result
