r"""Averages of transformed per-example gradients, :math:`\mathbb{E}_i[T(g_i)]`, and CABS.

Autograd hands out the batch gradient :math:`\bar g = \frac1n \sum_i g_i` (up to the loss's
reduction), where :math:`g_i = \nabla_\theta L_i` is example ``i``'s own gradient. Many methods
step along something else:

* the mean of a transformation, :math:`\mathbb{E}_i[T(g_i)] = \frac1n \sum_i T(g_i)`; DP-SGD
  clips every :math:`g_i` to a norm :math:`C` before averaging (Abadi et al. 2016);
* statistics of the :math:`g_i`: their norms, second moment :math:`\frac1n\sum_i g_i^2`,
  variance, the gradient noise scale (McCandlish et al. 2018), and the batch size that CABS
  chooses from the variance (Balles, Romero & Hennig 2017).

Neither is :math:`T(\bar g)`, and neither is :math:`\mathbb{E}_i[\nabla T(L_i)]` (transforming
the loss before differentiating): the three differ as soon as :math:`T` is not linear.

Two routes lead to the same numbers:

* **Materialized.** :func:`expected_transform` takes the per-example gradients themselves (the
  list of :func:`goodfellow.goodfellow_backprop`, or the dict ``PerExampleGradients.grads``),
  flattens them into a matrix of shape ``(n, P)`` and applies any ``T``. General, and costs
  ``n`` times the memory of the parameters.
* **Factored.** A linear layer's per-example gradient is :math:`g_i = \sum_t G_{i,t}
  A_{i,t}^\top` (``t`` runs over the positions of an input with extra dimensions; one term for
  plain vectors). Norms, weighted means (hence clipping) and, for plain vectors, second moments
  can be computed from :math:`A` and :math:`G` directly, never forming an ``(n, d_out, d_in)``
  tensor. The statistics of :mod:`goodfellow.statistics` accept either form and return the same
  numbers.

:func:`assign_grads` writes a result into ``p.grad``, so the usual loop runs unchanged:
``zero_grad``, ``backward``, transform, ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from goodfellow._autocast import without_autocast
from goodfellow._checks import check_same_kind

__all__ = [
    "assign_grads",
    "clip_to_norm",
    "expected_transform",
]

Transform = Callable[[Tensor], Tensor]
PerExampleGrads = Sequence[Tensor] | Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------
# Containers of per-example gradients: list/tuple (goodfellow_backprop) or dict (hooks)
# --------------------------------------------------------------------------------------------


def _unpack(
    per_example_grads: PerExampleGrads, allow_empty: bool = False
) -> tuple[list[str] | None, list[Tensor], int]:
    """Check a container of per-example gradients; return its keys, tensors and batch size.

    ``allow_empty`` accepts a batch of ``n = 0`` (sums over it are zeros; averages refuse it).
    """
    if isinstance(per_example_grads, Mapping):
        keys: list[str] | None = list(per_example_grads.keys())
        tensors = list(per_example_grads.values())
    elif isinstance(per_example_grads, (list, tuple)):
        keys, tensors = None, list(per_example_grads)
    else:
        raise TypeError(
            "per_example_grads must be the list returned by goodfellow_backprop / "
            "per_example_grads, or the dict PerExampleGradients.grads (name -> tensor), got "
            f"{type(per_example_grads).__name__}."
        )
    if not tensors:
        raise ValueError("per_example_grads is empty: pass one tensor per parameter.")
    labels = keys if keys is not None else [f"[{k}]" for k in range(len(tensors))]
    for label, g in zip(labels, tensors):
        if not isinstance(g, Tensor):
            raise TypeError(
                f"per_example_grads entry {label} must be a torch.Tensor of shape "
                f"(n, *param.shape), got {type(g).__name__}."
            )
        if g.dim() == 0:
            raise ValueError(
                f"per_example_grads entry {label} is a scalar; per-example gradients have a "
                "leading batch dimension, shape (n, *param.shape)."
            )
        if not g.is_floating_point():
            # an integer mean would round 1/n to 0 and return zeros without a word
            raise TypeError(
                f"per_example_grads entry {label} is a {g.dtype} tensor; gradients are "
                "floating point: convert with .to(torch.float64) or .float()."
            )
    first = tensors[0]
    n = first.shape[0]
    if n == 0 and not allow_empty:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")
    for label, g in zip(labels, tensors):
        if g.shape[0] != n:
            raise ValueError(
                f"per_example_grads entry {label} holds {g.shape[0]} examples but entry "
                f"{labels[0]} holds {n}: all entries must come from one batch."
            )
        check_same_kind(
            g, f"per_example_grads entry {label}", first, f"entry {labels[0]}",
            "use one dtype and device",
        )
    return keys, tensors, n


def _pack(template: object, keys: list[str] | None, tensors: list[Tensor]) -> PerExampleGrads:
    """Put ``tensors`` into the same kind of container as ``template``."""
    if keys is not None:
        return dict(zip(keys, tensors))
    return tuple(tensors) if isinstance(template, tuple) else list(tensors)


def _flatten(tensors: Sequence[Tensor], n: int) -> Tensor:
    """Concatenate per-example gradients into one row per example."""
    return torch.cat([g.reshape(n, math.prod(g.shape[1:])) for g in tensors], dim=1)  # (n, P)


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a ``(P,)`` vector into tensors of the parameters' shapes (``like[k].shape[1:]``)."""
    sizes = [math.prod(g.shape[1:]) for g in like]
    return [piece.reshape(g.shape[1:]) for piece, g in zip(torch.split(flat, sizes), like)]


def _check_transformed(transformed: object, flat: Tensor) -> Tensor:
    """Make sure ``T`` returned a finite tensor shaped like its input."""
    if not isinstance(transformed, Tensor):
        raise TypeError(
            f"T must return a torch.Tensor of shape {tuple(flat.shape)}, got "
            f"{type(transformed).__name__}."
        )
    if transformed.shape != flat.shape:
        raise ValueError(
            f"T must map the batch of flattened per-example gradients, shape (n, P) = "
            f"{tuple(flat.shape)}, to a tensor of the same shape, got "
            f"{tuple(transformed.shape)}. T sees all examples at once: reduce within an example "
            "over dim=1 (keepdim=True for per-example scalars), never over dim=0."
        )
    if transformed.dtype != flat.dtype or transformed.device != flat.device:
        raise TypeError(
            f"T must keep the dtype and device of its input ({flat.dtype} on {flat.device}), "
            f"got {transformed.dtype} on {transformed.device}."
        )
    finite = torch.isfinite(transformed).all(dim=1)  # (n,)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        inputs_finite = bool(torch.isfinite(flat[~finite]).all())
        cause = (
            "although their per-example gradients are finite: T divides by zero or overflows "
            "(e.g. g / ||g|| for a zero gradient; add an epsilon or clamp)"
            if inputs_finite
            else "and their per-example gradients are already non-finite: the loss diverged "
            "or the inputs hold NaN/inf"
        )
        raise ValueError(
            f"T returned non-finite values (NaN or inf) for {len(bad)} example(s) "
            f"(rows {shown}) {cause}."
        )
    return transformed


@without_autocast
def expected_transform(per_example_grads: PerExampleGrads, T: Transform) -> PerExampleGrads:
    r"""The average of a transformation of the per-example gradients, :math:`\frac1n\sum_i T(g_i)`.

    Every example's gradient (all parameters together) is flattened into a row of a matrix
    :math:`\mathcal{G}` of shape ``(n, P)``; ``T`` maps the whole matrix at once (so that it can
    be vectorized) and the mean of the rows of :math:`T(\mathcal{G})` is cut back into the
    shapes of the parameters.

    ``T`` may be anything differentiable: when the per-example gradients were built with
    ``create_graph=True`` (:func:`goodfellow.per_example_grads` has the flag), the result can be
    differentiated again w.r.t. the parameters.

    Args:
        per_example_grads: The list returned by :func:`goodfellow.goodfellow_backprop` (entries
            of shape ``(n, *param.shape)``), a tuple of such tensors, or the dict
            ``PerExampleGradients.grads`` (parameter name to ``(n, *param.shape)``).
        T: Callable mapping a tensor of shape ``(n, P)`` to a tensor of shape ``(n, P)``, row
            ``i`` being the transformation of example ``i``'s flattened gradient. It must keep
            dtype and device, and return finite values.

    Returns:
        The same kind of container (list, tuple or dict with the same keys), holding one tensor
        of shape ``param.shape`` per parameter: :math:`\frac1n\sum_i T(g_i)`.

    Raises:
        TypeError: If the container is not a list, tuple or dict of floating-point tensors,
            ``T`` is not callable, or ``T`` returns something other than a tensor of the
            input's dtype.
        ValueError: If the entries disagree on the batch size, the batch is empty, ``T``
            returns the wrong shape or non-finite values.

    Example:
        >>> model = goodfellow.MLP(3, [4], 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> grads = goodfellow.per_example_grads(model, nn.MSELoss(reduction="sum"), x, y)
        >>> mean_of_signs = expected_transform(grads, torch.sign)
        >>> [tuple(t.shape) for t in mean_of_signs]
        [(4, 3), (4,), (2, 4), (2,)]
    """
    keys, tensors, n = _unpack(per_example_grads)
    if not callable(T):
        raise TypeError(f"T must be callable, got {type(T).__name__}.")
    flat = _flatten(tensors, n)  # (n, P)
    transformed = _check_transformed(T(flat), flat)  # (n, P)
    return _pack(per_example_grads, keys, _unflatten(transformed.mean(dim=0), tensors))


def assign_grads(params_or_model: nn.Module | Iterable[Tensor], grads: PerExampleGrads) -> None:
    """Write one gradient per parameter into ``p.grad``, replacing what ``backward`` left there.

    With it the ordinary training loop steps along any transformed gradient::

        optimizer.zero_grad()
        loss.backward()                      # p.grad = batch gradient (unused below)
        assign_grads(model, clipped_mean(mlp_factors(activations, linear_grads), 1.0))
        optimizer.step()                     # steps along the clipped mean

    Args:
        params_or_model: A module (its parameters with ``requires_grad``, in the order of
            ``model.named_parameters()``) or an iterable of parameters.
        grads: A list or tuple with one tensor per parameter, in the same order, or a dict from
            the parameter names of ``model.named_parameters()`` (then pass the model). Each
            tensor has the shape and dtype of its parameter. The tensors are detached and
            copied.

    Raises:
        TypeError: For a dict without a model, or entries that are not tensors.
        ValueError: If the number of gradients, their names, shapes or dtypes do not match the
            parameters.
    """
    if isinstance(params_or_model, nn.Module):
        named = [(name, p) for name, p in params_or_model.named_parameters() if p.requires_grad]
    elif isinstance(params_or_model, Tensor):
        raise TypeError(
            "params_or_model must be a module or an iterable of parameters, got a single "
            "tensor; wrap it in a list."
        )
    elif isinstance(params_or_model, Iterable):
        named = [(f"[{k}]", p) for k, p in enumerate(params_or_model)]
    else:
        raise TypeError(
            "params_or_model must be an nn.Module or an iterable of parameters, got "
            f"{type(params_or_model).__name__}."
        )
    if isinstance(grads, Mapping):
        if not isinstance(params_or_model, nn.Module):
            raise TypeError(
                "grads is a dict keyed by parameter name: pass the model (not a list of "
                "parameters) so the names can be matched."
            )
        names = [name for name, _ in named]
        missing = [name for name in names if name not in grads]
        unknown = [key for key in grads if key not in names]
        if missing or unknown:
            raise ValueError(
                f"grads must hold exactly the trainable parameters of the model; missing "
                f"{missing}, unknown {unknown}."
            )
        pairs = [(name, p, grads[name]) for name, p in named]
    elif isinstance(grads, (list, tuple)):
        if len(grads) != len(named):
            raise ValueError(
                f"got {len(grads)} gradients for {len(named)} parameters; pass one per "
                "parameter with requires_grad, in the order of model.parameters()."
            )
        pairs = [(name, p, g) for (name, p), g in zip(named, grads)]
    else:
        raise TypeError(
            f"grads must be a list, tuple or dict of tensors, got {type(grads).__name__}."
        )
    for name, p, g in pairs:
        if not isinstance(g, Tensor):
            raise TypeError(
                f"the gradient for parameter {name} is a {type(g).__name__}, not a tensor."
            )
        if g.shape != p.shape:
            raise ValueError(
                f"the gradient for parameter {name} has shape {tuple(g.shape)} but the "
                f"parameter has shape {tuple(p.shape)}; pass averaged gradients (no batch "
                "dimension), in the order of the parameters."
            )
        check_same_kind(
            g, f"the gradient for parameter {name}", p, "the parameter",
            "convert it with .to(param)",
        )
    for _, p, g in pairs:
        p.grad = g.detach().clone()


# --------------------------------------------------------------------------------------------
# Built-in transformations
# --------------------------------------------------------------------------------------------


def _check_max_norm(max_norm: float) -> float:
    from goodfellow._checks import real_number  # here: this check is the only user in the file

    max_norm = real_number(max_norm, "max_norm", "a positive number")  # NumPy scalars too
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(
            f"max_norm must be a positive finite number (the clipping norm C > 0), got {max_norm}."
        )
    return float(max_norm)


def _clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    r""":math:`\min(1, C / \|g_i\|)`, written so that a zero gradient gets factor 1."""
    return max_norm / norms.clamp(min=max_norm)  # (n,)


def clip_to_norm(max_norm: float) -> Transform:
    r"""The DP-SGD clipping transformation :math:`T(g) = g \min(1, C / \|g\|_2)`.

    Each example's whole gradient (all parameters together) is scaled down to norm at most
    :math:`C` (Abadi et al. 2016, arXiv:1607.00133); gradients shorter than :math:`C` are left
    as they are. Pass the result to :func:`expected_transform`;
    :func:`goodfellow.clipped_mean` computes
    the same average from the factored form without materializing anything.

    Args:
        max_norm: The clipping norm :math:`C > 0`.

    Returns:
        ``T``, mapping ``(n, P)`` to ``(n, P)``.

    Raises:
        ValueError: If ``max_norm`` is not a positive finite number.
    """
    max_norm = _check_max_norm(max_norm)

    def clip(flat: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(flat, dim=1)  # (n,)
        return flat * _clip_factors(norms, max_norm).unsqueeze(1)  # (n, P)

    return clip
