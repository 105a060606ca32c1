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
  tensor. :class:`LinearFactors` holds one layer in this form; :func:`mlp_factors` (an MLP),
  :func:`recorded_factors` (what ``PerExampleGradients`` recorded) and :func:`linear_factors`
  (any layer's tensors) build it. The statistics functions (:func:`gradient_norms`,
  :func:`clipped_mean`, :func:`gradient_mean`, :func:`gradient_second_moment`,
  :func:`gradient_variance`, :func:`gradient_variance_trace`, :func:`noise_scale_parts`,
  :func:`gradient_noise_scale`) accept either form and return the same numbers.

:func:`assign_grads` writes a result into ``p.grad``, so the usual loop runs unchanged:
``zero_grad``, ``backward``, transform, ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from goodfellow.backprop import (
    batch_size_factor,
    batched_outer,
    check_layer_lists,
    norm_from_squares,
    outer_sq_norms,
)

__all__ = [
    "CABS",
    "AdaptiveBatchSampler",
    "LinearFactors",
    "adaptive_batches",
    "assign_grads",
    "clip_to_norm",
    "clipped_mean",
    "expected_transform",
    "gradient_mean",
    "gradient_noise_scale",
    "gradient_norms",
    "gradient_second_moment",
    "gradient_variance",
    "gradient_variance_trace",
    "linear_factors",
    "mlp_factors",
    "noise_scale_parts",
    "recorded_factors",
]

Transform = Callable[[Tensor], Tensor]
PerExampleGrads = Sequence[Tensor] | Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------
# Containers of per-example gradients: list/tuple (goodfellow_backprop) or dict (hooks)
# --------------------------------------------------------------------------------------------


def _unpack(per_example_grads: PerExampleGrads) -> tuple[list[str] | None, list[Tensor], int]:
    """Check a container of per-example gradients; return its keys, tensors and batch size."""
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
    if n == 0:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")
    for label, g in zip(labels, tensors):
        if g.shape[0] != n:
            raise ValueError(
                f"per_example_grads entry {label} holds {g.shape[0]} examples but entry "
                f"{labels[0]} holds {n}: all entries must come from one batch."
            )
        if g.dtype != first.dtype or g.device != first.device:
            raise ValueError(
                f"per_example_grads entry {label} is {g.dtype} on {g.device} but entry "
                f"{labels[0]} is {first.dtype} on {first.device}; use one dtype and device."
            )
    return keys, tensors, n


def _pack(template: object, keys: list[str] | None, tensors: list[Tensor]) -> PerExampleGrads:
    """Put ``tensors`` into the same kind of container as ``template``."""
    if keys is not None:
        return dict(zip(keys, tensors))
    return tuple(tensors) if isinstance(template, tuple) else list(tensors)


def _flatten(tensors: Sequence[Tensor], n: int) -> Tensor:
    """Concatenate per-example gradients into one row per example."""
    return torch.cat([g.reshape(n, -1) for g in tensors], dim=1)  # (n, P)


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
        if g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"the gradient for parameter {name} is {g.dtype} on {g.device} but the parameter "
                f"is {p.dtype} on {p.device}."
            )
    for _, p, g in pairs:
        p.grad = g.detach().clone()


# --------------------------------------------------------------------------------------------
# Built-in transformations
# --------------------------------------------------------------------------------------------


def _check_max_norm(max_norm: float) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a positive number, got {type(max_norm).__name__}.")
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
    as they are. Pass the result to :func:`expected_transform`; :func:`clipped_mean` computes
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


# --------------------------------------------------------------------------------------------
# The factored form of linear layers
# --------------------------------------------------------------------------------------------


class LinearFactors(NamedTuple):
    r"""One linear layer's per-example gradients, kept as their two factors.

    Example ``i``'s gradient is :math:`\partial L_i / \partial W = \sum_t G_{i,t} A_{i,t}^\top`
    and :math:`\partial L_i / \partial b = \sum_t G_{i,t}`, with ``t`` the positions of an input
    with extra dimensions (a single position for plain vectors).

    Attributes:
        inputs: The layer's inputs :math:`A`, shape ``(n, T, d_in)``.
        grad_outputs: :math:`G`, the gradient of example ``i``'s own loss :math:`L_i` w.r.t. the
            layer's outputs, shape ``(n, T, d_out)`` (already multiplied by the batch size for
            a mean-reduced loss: build it with :func:`linear_factors` or :func:`mlp_factors`).
        bias: Whether the layer has a bias.
    """

    #: The layer's inputs :math:`A`, shape ``(n, T, d_in)``.
    inputs: Tensor
    #: Each example's own output gradients :math:`G`, shape ``(n, T, d_out)``.
    grad_outputs: Tensor
    #: Whether the layer has a bias.
    bias: bool


def _positions(tensors: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """Reshape one use ``(n, ..., d)`` or several uses of a layer into ``(n, T, d)``."""
    uses = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not uses:
        raise ValueError(f"{name} is empty: pass the tensor recorded at each use of the layer.")
    for k, t in enumerate(uses):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be floating point, got {t.dtype}: convert with .float() or "
                ".double()."
            )
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have shape (n, ..., features), got shape {tuple(t.shape)}."
            )
    n = uses[0].shape[0]
    laid_out = [t.reshape(n, -1, t.shape[-1]) for t in uses]  # views where the layout allows
    if len(laid_out) == 1:
        return laid_out[0]  # (n, T, d), no copy: the statistics only read the factors
    # A layer used several times in one forward: its gradient is the sum over all uses, which is
    # the sum over the positions of all uses laid end to end.
    return torch.cat(laid_out, dim=1)  # (n, T, d)


def linear_factors(
    inputs: Tensor | Sequence[Tensor],
    grad_outputs: Tensor | Sequence[Tensor],
    bias: bool = True,
    loss_reduction: str = "sum",
) -> LinearFactors:
    """The factored per-example gradient of one linear layer, from what hooks record.

    Args:
        inputs: The layer's input, shape ``(n, ..., d_in)``; or a list with one such tensor per
            use of the layer in the forward pass.
        grad_outputs: The gradient of the batch loss w.r.t. the layer's output, shape
            ``(n, ..., d_out)`` with the same middle dimensions (or a list, one per use, in the
            order of ``inputs``).
        bias: Whether the layer has a bias.
        loss_reduction: How the batch loss was reduced: ``"sum"`` or ``"mean"`` (then
            ``grad_outputs`` is multiplied by ``n``, as in :func:`goodfellow.goodfellow_backprop`).
            Pass ``"sum"`` for gradients already scaled to example ``i``'s own loss.

    Returns:
        A :class:`LinearFactors` with tensors of shape ``(n, T, d_in)`` and ``(n, T, d_out)``:
        views of ``inputs`` and ``grad_outputs`` for a single use (no copy; ``grad_outputs``
        is copied once, scaled, for ``"mean"``).

    Raises:
        TypeError: If the inputs are not floating-point tensors.
        ValueError: If the shapes, batch sizes, dtypes or numbers of uses do not fit together.
    """
    if isinstance(inputs, Tensor) != isinstance(grad_outputs, Tensor):
        raise ValueError(
            "pass inputs and grad_outputs both as tensors or both as lists (one per use)."
        )
    if not isinstance(inputs, Tensor):
        if not isinstance(inputs, Sequence) or not isinstance(grad_outputs, Sequence):
            raise TypeError("inputs and grad_outputs must be tensors or lists of tensors.")
        if len(inputs) != len(grad_outputs):
            raise ValueError(
                f"got {len(inputs)} inputs but {len(grad_outputs)} grad_outputs: pass one of "
                "each per use of the layer."
            )
        pairs = list(zip(inputs, grad_outputs))
    else:
        pairs = [(inputs, grad_outputs)]
    for k, (a, g) in enumerate(pairs):
        if isinstance(a, Tensor) and isinstance(g, Tensor) and a.shape[:-1] != g.shape[:-1]:
            raise ValueError(
                f"use {k}: inputs of shape {tuple(a.shape)} and grad_outputs of shape "
                f"{tuple(g.shape)} must agree in all but the last (feature) dimension."
            )
    A = _positions(inputs, "inputs")  # (n, T, d_in)
    G = _positions(grad_outputs, "grad_outputs")  # (n, T, d_out)
    if A.dtype != G.dtype or A.device != G.device:
        raise ValueError(
            f"inputs are {A.dtype} on {A.device} but grad_outputs are {G.dtype} on {G.device}."
        )
    if A.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0).")
    scale = batch_size_factor(loss_reduction, A.shape[0])
    return LinearFactors(A, G * scale if scale != 1 else G, bool(bias))


def mlp_factors(
    activations: Sequence[Tensor], linear_grads: Sequence[Tensor], loss_reduction: str = "sum"
) -> list[LinearFactors]:
    """The factored per-example gradients of a :class:`goodfellow.MLP`, one entry per layer.

    Statistics computed from the result come out as lists ``[W_1, b_1, ..., W_L, b_L]``, the
    layout of :func:`goodfellow.goodfellow_backprop` and of ``model.parameters()``.

    Args:
        activations: Inputs of the linear layers, ``activations[l]`` of shape ``(n, d_l)``.
        linear_grads: ``torch.autograd.grad(loss, linear_combs)``, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})`` (with ``create_graph=True`` to differentiate the statistics).
        loss_reduction: ``"sum"`` or ``"mean"``, as for :func:`goodfellow.goodfellow_backprop`.

    Returns:
        One :class:`LinearFactors` per layer, each with ``T = 1`` position.

    Raises:
        TypeError: If the arguments are not lists of tensors.
        ValueError: If the lists do not describe one batch through one chain of layers (see
            :func:`goodfellow.goodfellow_backprop`).
    """
    # the same checks as goodfellow_backprop: one chain of (n, features) layers, one batch
    check_layer_lists(activations, linear_grads)
    factors = [
        linear_factors(a, g, True, loss_reduction) for a, g in zip(activations, linear_grads)
    ]
    _check_factors(factors)
    return factors


def recorded_factors(recorder: object) -> dict[str, LinearFactors]:
    """The factored per-example gradients of every ``nn.Linear`` a recorder saw in its batch.

    Reads ``recorder.layers`` of a :class:`goodfellow.PerExampleGradients` after the batch's
    ``loss.backward()``: each layer's inputs and per-example output gradients (all calls of the
    layer). Statistics computed from the result are dicts keyed like
    ``model.named_parameters()`` (``"fc1.weight"``, ``"fc1.bias"``, ...), ready for
    :func:`assign_grads`::

        with PerExampleGradients(model, loss_reduction="mean") as pe:
            F.cross_entropy(model(x), y).backward()
        assign_grads(model, clipped_mean(recorded_factors(pe), max_norm=1.0))

    Args:
        recorder: A :class:`goodfellow.PerExampleGradients` that recorded a forward and a
            backward.

    Returns:
        Module name to :class:`LinearFactors`, for every Linear with a trainable weight, in the
        order of ``model.named_modules()``. A frozen bias is left out of the layer's results.

    Raises:
        TypeError: If ``recorder`` has no ``layers`` dict of records.
        ValueError: If a layer's weight is frozen while its bias is trained, or a weight is
            shared by several Linear modules (use ``recorder.grads`` for those).
        RuntimeError: If no forward and backward were recorded for the batch.
    """
    layers = getattr(recorder, "layers", None)
    if not isinstance(layers, Mapping):
        raise TypeError(
            "recorder must be a goodfellow.PerExampleGradients that recorded a batch, got "
            f"{type(recorder).__name__}."
        )
    factors: dict[str, LinearFactors] = {}
    owner_of_weight: dict[int, str] = {}
    for name, record in layers.items():
        module = record.module
        has_bias = module.bias is not None and module.bias.requires_grad
        if not module.weight.requires_grad:
            if has_bias:
                raise ValueError(
                    f"Linear {name!r} has a frozen weight but a trainable bias, which the "
                    "factored form does not cover; use recorder.grads."
                )
            continue
        if id(module.weight) in owner_of_weight:
            raise ValueError(
                f"Linear {name!r} shares its weight with {owner_of_weight[id(module.weight)]!r}; "
                "the factored form keeps one layer per weight: use recorder.grads."
            )
        owner_of_weight[id(module.weight)] = name
        if record.inputs:
            inputs = list(record.inputs)
            grad_outputs = record.per_example_grad_outputs  # raises if no backward was recorded
        else:  # not called in this batch: a zero gradient
            n = getattr(recorder, "batch_size", None)
            if n is None:
                raise RuntimeError(
                    "the recorder holds no batch: run the forward and loss.backward() inside "
                    "`with PerExampleGradients(model) as pe:` first."
                )
            like = module.weight
            inputs = [torch.zeros(n, 1, module.in_features, dtype=like.dtype, device=like.device)]
            grad_outputs = [inputs[0].new_zeros(n, 1, module.out_features)]
        factors[name] = linear_factors(inputs, grad_outputs, has_bias, "sum")
    if not factors:
        raise ValueError("the recorder holds no Linear layer with a trainable weight.")
    return factors


# --------------------------------------------------------------------------------------------
# Kernels on one layer in factored form. Index letters: n example, t position, o output
# feature, i input feature.
# --------------------------------------------------------------------------------------------


def _layer_sq_norms(layer: LinearFactors) -> Tensor:
    r"""Squared norms :math:`\|g_i\|^2` of one layer's per-example gradients, ``(n,)``.

    The weight part is :math:`\|\sum_t G_t A_t^\top\|_F^2 = \sum_{t,s} (G_t \cdot G_s)
    (A_t \cdot A_s)`: the two Gram matrices over positions, multiplied entrywise and summed,
    ``einsum("nts,nts->n", G G^T, A A^T)``. For one position it is
    :math:`\|G\|^2 \|A\|^2`. The Gram route costs :math:`T^2 (d_{in} + d_{out})` per example,
    the materialized one :math:`T d_{in} d_{out}`; the cheaper one is taken.
    """
    A, G, has_bias = layer
    n, positions, d_in = A.shape
    d_out = G.shape[2]
    if positions == 1:
        return outer_sq_norms(G[:, 0], A[:, 0], bias=has_bias)  # (n,)
    if positions * (d_in + d_out) <= d_in * d_out:
        gram_G = torch.bmm(G, G.transpose(1, 2))  # (n, t, t)
        gram_A = torch.bmm(A, A.transpose(1, 2))  # (n, t, t)
        weight = (gram_G * gram_A).sum(dim=(1, 2))  # (n,)
    else:
        weight = batched_outer(G, A).square().sum(dim=(1, 2))  # (n, o, i) -> (n,)
    if has_bias:
        weight = weight + G.sum(dim=1).square().sum(dim=1)  # (n,)
    return weight


def _layer_weighted_sum(layer: LinearFactors, weights: Tensor) -> list[Tensor]:
    r""":math:`\sum_i w_i g_i` for one layer: one contraction ``einsum("n,nto,nti->oi")``."""
    A, G, has_bias = layer
    d_in, d_out = A.shape[2], G.shape[2]
    weighted = G * weights[:, None, None]  # (n, t, o)
    weight_grad = weighted.reshape(-1, d_out).T @ A.reshape(-1, d_in)  # (o, i)
    return [weight_grad, weighted.sum(dim=(0, 1))] if has_bias else [weight_grad]  # (o,)


def _layer_second_moment(layer: LinearFactors) -> list[Tensor]:
    r"""Entrywise :math:`\frac1n\sum_i g_i^2` of one layer.

    For one position :math:`(G_{io} A_{ii'})^2 = G_{io}^2 A_{ii'}^2`, so the moment is
    ``einsum("no,ni->oi", G**2, A**2) / n``, a single matrix product. With several positions the
    square of a sum over ``t`` does not factor, and the per-example gradients are formed.
    """
    A, G, has_bias = layer
    n = A.shape[0]
    if A.shape[1] == 1:
        weight = G[:, 0].square().T @ A[:, 0].square() / n  # (o, i)
    else:
        weight = batched_outer(G, A).square().mean(dim=0)  # (n, o, i) -> (o, i)
    return [weight, G.sum(dim=1).square().mean(dim=0)] if has_bias else [weight]  # (o,)


def _is_factored(source: object) -> bool:
    if isinstance(source, LinearFactors):
        return True
    values = list(source.values()) if isinstance(source, Mapping) else source
    if isinstance(values, (list, tuple)) and values:
        kinds = {isinstance(v, LinearFactors) for v in values}
        if kinds == {True, False}:
            raise TypeError(
                "mix of LinearFactors and other entries: pass either per-example gradients "
                "or the factored form of every layer."
            )
        return kinds == {True}
    return False


def _factor_layers(source: object) -> tuple[list[str] | None, list[LinearFactors]]:
    if isinstance(source, LinearFactors):
        return None, [source]
    if isinstance(source, Mapping):
        return list(source.keys()), list(source.values())
    return None, list(source)  # type: ignore[arg-type]


def _check_factors(layers: Sequence[LinearFactors]) -> int:
    for k, layer in enumerate(layers):
        for name, t in (("inputs", layer.inputs), ("grad_outputs", layer.grad_outputs)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(
                    f"layer {k}: LinearFactors.{name} must be a floating-point torch.Tensor, "
                    f"got {kind}; build the factors with linear_factors."
                )
    first = layers[0].inputs
    n = first.shape[0]
    for k, layer in enumerate(layers):
        A, G, _ = layer
        if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
            raise ValueError(
                f"layer {k}: LinearFactors need inputs (n, T, d_in) and grad_outputs "
                f"(n, T, d_out), got {tuple(A.shape)} and {tuple(G.shape)}; build them with "
                "linear_factors."
            )
        if A.shape[0] != n:
            raise ValueError(
                f"layer {k} holds {A.shape[0]} examples but layer 0 holds {n}: all layers must "
                "come from one batch."
            )
        if (
            A.dtype != first.dtype
            or G.dtype != first.dtype
            or A.device != first.device
            or G.device != first.device
        ):
            raise ValueError(f"layer {k} differs in dtype or device from layer 0.")
    if n == 0:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")
    return n


def _pack_factored(
    source: object, keys: list[str] | None, per_layer: list[list[Tensor]]
) -> PerExampleGrads:
    """Lay per-layer results out as ``[W, b, ...]``, or ``{name.weight, name.bias}`` for dicts."""
    if keys is None:
        return [t for layer in per_layer for t in layer]
    out: dict[str, Tensor] = {}
    for key, layer in zip(keys, per_layer):
        for suffix, t in zip(("weight", "bias"), layer):
            out[f"{key}.{suffix}" if key else suffix] = t  # "" is the root module
    return out


# --------------------------------------------------------------------------------------------
# Statistics, on either form
# --------------------------------------------------------------------------------------------


def _sq_norms(source: object) -> Tensor:
    if _is_factored(source):
        _, layers = _factor_layers(source)
        _check_factors(layers)
        return sum(_layer_sq_norms(layer) for layer in layers)  # type: ignore[return-value]
    _, tensors, n = _unpack(source)  # type: ignore[arg-type]
    return _flatten(tensors, n).square().sum(dim=1)  # (n,)


def gradient_norms(source: PerExampleGrads | LinearFactors | Sequence[LinearFactors]) -> Tensor:
    r"""The L2 norm of each example's whole gradient, :math:`\|g_i\|_2` over all parameters.

    In factored form each layer contributes :math:`\sum_{t,s}(G_t\cdot G_s)(A_t\cdot A_s)`
    (:math:`\|G\|^2\|A\|^2` for plain vectors) plus :math:`\|\sum_t G_t\|^2` for its bias;
    nothing of size ``n * d_out * d_in`` is formed when the Gram matrices are smaller.

    Args:
        source: Per-example gradients (list, tuple or dict of ``(n, *param.shape)`` tensors),
            or their factored form: a :class:`LinearFactors`, a list of them (e.g. from
            :func:`mlp_factors`) or a dict of them.

    Returns:
        Tensor of shape ``(n,)``; differentiable if the source is (derivative 0 at a zero
        gradient, as for ``torch.linalg.vector_norm``).
    """
    return norm_from_squares(_sq_norms(source))  # (n,)


def _weighted_sum(source: object, weights: Tensor) -> PerExampleGrads:
    r""":math:`\sum_i w_i g_i` in the source's layout, one contraction per tensor."""
    if _is_factored(source):
        keys, layers = _factor_layers(source)
        _check_factors(layers)
        per_layer = [_layer_weighted_sum(layer, weights) for layer in layers]
        return _pack_factored(source, keys, per_layer)
    keys, tensors, n = _unpack(source)  # type: ignore[arg-type]
    # einsum("n,n...->...") as a matrix-vector product on the flattened rows
    summed = [(weights @ g.reshape(n, -1)).reshape(g.shape[1:]) for g in tensors]
    return _pack(source, keys, summed)


def _batch_size(source: object) -> int:
    if _is_factored(source):
        return _check_factors(_factor_layers(source)[1])
    return _unpack(source)[2]  # type: ignore[arg-type]


def _uniform_weights(source: object, n: int) -> Tensor:
    """``(n,)`` weights ``1/n`` in the source's dtype and device."""
    if _is_factored(source):
        like = _factor_layers(source)[1][0].inputs
    else:
        like = _unpack(source)[1][0]  # type: ignore[arg-type]
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def gradient_mean(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
) -> PerExampleGrads:
    r"""The batch gradient :math:`\bar g = \frac1n\sum_i g_i` (of the per-example losses' mean).

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.

    Returns:
        One tensor of shape ``param.shape`` per parameter: the source's container for
        per-example gradients; ``[W, b, ...]`` for a list of factors; ``{"name.weight",
        "name.bias"}`` for a dict of factors keyed by module name.
    """
    n = _batch_size(source)
    return _weighted_sum(source, _uniform_weights(source, n))


def clipped_mean(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], max_norm: float
) -> PerExampleGrads:
    r"""The DP-SGD clipped mean :math:`\frac1n\sum_i g_i\min(1, C/\|g_i\|)`, by reweighting.

    Clipping multiplies each example's gradient by a scalar, so the clipped mean is the
    weighted sum :math:`\sum_i w_i g_i` with :math:`w_i = \min(1, C/\|g_i\|)/n`. In factored
    form that is one contraction per layer, ``einsum("n,nto,nti->oi", w, G, A)``: the rows of
    :math:`G` are rescaled before the usual batch-gradient product, and no per-example tensor
    is formed (the norms come from :func:`gradient_norms`). Abadi et al. 2016,
    arXiv:1607.00133; the noise DP-SGD adds afterwards is not part of this function.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        max_norm: The clipping norm :math:`C > 0`.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``max_norm`` is not a positive finite number, or an example's gradient
            holds NaN or inf.
    """
    max_norm = _check_max_norm(max_norm)
    n = _batch_size(source)
    # gradient_norms has derivative 0 at a zero gradient, so the clamp's 0 stays 0 (no NaN)
    norms = gradient_norms(source)  # (n,)
    _check_finite_norms(norms)
    weights = _clip_factors(norms, max_norm) / n  # (n,)
    return _weighted_sum(source, weights)


def _check_finite_norms(norms: Tensor) -> None:
    """Refuse non-finite per-example gradients, which would make the weighted sum NaN.

    An infinite norm gets the weight ``C / inf = 0``, and ``0 * inf`` is NaN: the clipped mean
    would be NaN with no hint of which example diverged.
    """
    if norms.device.type == "meta":  # a shape-only run (device="meta") has no values to check
        return
    finite = torch.isfinite(norms)  # (n,)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"the per-example gradients of {len(bad)} example(s) (rows {shown}) hold NaN or "
            "inf, so no clipped mean exists: the loss diverged or the inputs hold NaN/inf "
            "(lower the learning rate or check the data)."
        )


def gradient_second_moment(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
) -> PerExampleGrads:
    r"""The entrywise second moment :math:`\frac1n\sum_i g_i \odot g_i`.

    In factored form, for plain vector inputs, :math:`\frac1n (G^{\circ 2})^\top A^{\circ 2}`
    per layer (squares taken entrywise: the trick of Balles, Romero & Hennig's reference code);
    layers with several positions form their per-example gradients.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.
    """
    if _is_factored(source):
        keys, layers = _factor_layers(source)
        _check_factors(layers)
        return _pack_factored(source, keys, [_layer_second_moment(layer) for layer in layers])
    return expected_transform(source, torch.square)  # type: ignore[arg-type]


def _correction(n: int, unbiased: bool) -> float:
    """``n / (n - 1)`` for the unbiased estimator, else ``1``."""
    if not unbiased:
        return 1.0
    if n < 2:
        raise ValueError(
            "the unbiased (n - 1) variance needs at least 2 examples in the batch, got 1; "
            "use unbiased=False or a larger batch."
        )
    return n / (n - 1)


def gradient_variance(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = False
) -> PerExampleGrads:
    r"""The entrywise variance of the per-example gradients: the diagonal of their covariance.

    .. math::

        \operatorname{Var}[g] = \frac1{n - c} \sum_i (g_i - \bar g)^2, \qquad c = 0
        \text{ (default) or } 1 \text{ (unbiased)}.

    With ``c = 0`` it is the variance of the batch's empirical distribution; ``c = 1`` gives the
    unbiased estimate of the variance of a single example's gradient over the data distribution.
    Per-example gradients are centered first (two passes, no cancellation); the factored form
    uses :math:`\frac{n}{n-c}(\overline{g^2} - \bar g^2)`, which loses relative accuracy where
    the variance is tiny compared with :math:`\bar g^2`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Divide by ``n - 1`` instead of ``n``.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    if _is_factored(source):
        n = _batch_size(source)
        correction = _correction(n, unbiased)
        moment, mean = gradient_second_moment(source), gradient_mean(source)
        if isinstance(moment, dict):
            return {key: (moment[key] - mean[key].square()) * correction for key in moment}
        return [(m - g.square()) * correction for m, g in zip(moment, mean)]
    keys, tensors, n = _unpack(source)  # type: ignore[arg-type]
    correction = _correction(n, unbiased)
    flat = _flatten(tensors, n)  # (n, P)
    centered = flat - flat.mean(dim=0)  # (n, P)
    variance = centered.square().mean(dim=0) * correction  # (P,)
    return _pack(source, keys, _unflatten(variance, tensors))


def _trace_and_mean(source: object, unbiased: bool) -> tuple[Tensor, PerExampleGrads]:
    r"""The trace of the covariance and the mean gradient, from the same pass."""
    n = _batch_size(source)
    correction = _correction(n, unbiased)
    mean = gradient_mean(source)
    values = mean.values() if isinstance(mean, dict) else mean
    if _is_factored(source):
        # tr Cov = mean_i ||g_i||^2 - ||g_bar||^2 (factored: the g_i are never formed)
        mean_sq_norm = _sq_norms(source).mean()
        trace = mean_sq_norm - sum(g.square().sum() for g in values)
    else:
        tensors = _unpack(source)[1]  # type: ignore[arg-type]
        flat = _flatten(tensors, n)  # (n, P)
        centered = flat - _flatten([g.unsqueeze(0) for g in values], 1)  # (n, P)
        trace = centered.square().sum() / n
    return trace * correction, mean


def gradient_variance_trace(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = False
) -> Tensor:
    r"""The trace of the per-example gradients' covariance, :math:`\operatorname{tr}\Sigma`.

    .. math::

        \operatorname{tr}\Sigma = \frac1{n - c}\sum_i \|g_i - \bar g\|^2
        = \frac{n}{n - c}\Big(\frac1n\sum_i\|g_i\|^2 - \|\bar g\|^2\Big),

    the second form used for the factored source (norms from :func:`gradient_norms`, no
    per-example tensor). ``c = 0`` matches CABS's reference code; ``c = 1`` is unbiased. The
    variance of the batch gradient :math:`\bar g` itself is :math:`\operatorname{tr}\Sigma / n`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Divide by ``n - 1`` instead of ``n``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    return _trace_and_mean(source, unbiased)[0]


def noise_scale_parts(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Estimates of :math:`\operatorname{tr}\Sigma` and :math:`|G|^2` from one batch.

    :math:`G` is the expected gradient. Since
    :math:`\mathbb{E}\|\bar g\|^2 = |G|^2 + \operatorname{tr}\Sigma / n`, the unbiased
    estimates are :math:`S = \operatorname{tr}\hat\Sigma` (with ``n - 1``) and
    :math:`|G|^2 \approx \|\bar g\|^2 - S / n` (McCandlish et al. 2018, arXiv:1812.06162,
    appendix A, with batch sizes ``1`` and ``n``). Average each over steps before dividing:
    the ratio of two noisy estimates is biased, and the second one can be negative when the
    noise dominates. ``unbiased=False`` returns the plug-in values
    :math:`\operatorname{tr}\hat\Sigma` (with ``n``) and :math:`\|\bar g\|^2`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Return the unbiased estimates (needs ``n >= 2``).

    Returns:
        ``(trace, squared_norm)``, two scalar tensors.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    trace, mean = _trace_and_mean(source, unbiased)
    values = mean.values() if isinstance(mean, dict) else mean
    squared_norm = sum(g.square().sum() for g in values)
    if unbiased:
        squared_norm = squared_norm - trace / _batch_size(source)
    return trace, squared_norm  # type: ignore[return-value]


def gradient_noise_scale(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = True
) -> Tensor:
    r"""The simple gradient noise scale, :math:`\mathcal{B} = \operatorname{tr}\Sigma / |G|^2`.

    McCandlish et al. 2018 (arXiv:1812.06162) show it predicts the critical batch size: batches
    much smaller than :math:`\mathcal{B}` waste steps, much larger ones waste examples. One
    batch's estimate is noisy; see :func:`noise_scale_parts` for the parts to average.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Use the unbiased estimates of both parts (see :func:`noise_scale_parts`).

    Returns:
        A scalar tensor (negative or infinite when the noise swamps the unbiased estimate of
        :math:`|G|^2`).

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example, or every per-example
            gradient is zero (the ratio is then 0/0).
    """
    trace, squared_norm = noise_scale_parts(source, unbiased)
    # Both parts vanish only when every g_i is 0; the ratio would be a silent NaN.
    if bool(trace == 0) and bool(squared_norm == 0):
        raise ValueError(
            "every per-example gradient is zero, so the noise scale tr(Sigma) / |G|^2 is 0/0; "
            "the batch carries no gradient (check that the loss depends on the parameters)."
        )
    return trace / squared_norm


# --------------------------------------------------------------------------------------------
# CABS: SGD with coupled adaptive batch sizes
# --------------------------------------------------------------------------------------------


def _check_bounds(bounds: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds must be a pair (min_batch_size, max_batch_size), got {bounds!r}.")
    low, high = bounds
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"bounds must hold two integers, got {bounds!r}.")
    if low < 1:
        raise ValueError(f"the smallest batch size must be at least 1, got bounds {bounds!r}.")
    if low > high:
        raise ValueError(
            f"bounds are out of order: min_batch_size {low} > max_batch_size {high}; pass "
            "(min, max)."
        )
    return low, high


def _check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a positive number, got {type(lr).__name__}.")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr}.")
    return float(lr)


class CABS(torch.optim.Optimizer):
    r"""SGD with Coupled Adaptive Batch Sizes (Balles, Romero & Hennig 2017, arXiv:1612.05086).

    Plain SGD, :math:`\theta \leftarrow \theta - \alpha \bar g`, that also picks the size of the
    next batch. The paper bounds the expected gain of an SGD step and maximizes the gain per
    example seen; with the objective's minimum taken to be 0 the batch size that does so is

    .. math::

        m = \frac{\alpha \operatorname{tr}\Sigma(\theta)}{L(\theta)},

    where :math:`\Sigma` is the covariance of one example's gradient and :math:`L` the loss:
    small batches while the loss is large compared with the gradient noise, larger ones as
    training converges. This replaces a decaying learning rate. As in the reference
    (TensorFlow) code, the two noisy quantities are smoothed by exponential running averages
    with ``decay`` 0.95, started at :math:`\xi = 0` and :math:`L = 1` and updated before they
    are used:

    .. math::

        \xi \leftarrow \mu\xi + (1-\mu)\operatorname{tr}\hat\Sigma,

        \bar L \leftarrow \mu\bar L + (1-\mu)\tfrac1n\textstyle\sum_i L_i,

        m \leftarrow \operatorname{clip}\big(\lceil \alpha\xi/\bar L\rceil,
        m_\text{min}, m_\text{max}\big),

    with :math:`\operatorname{tr}\hat\Sigma = \frac1n\sum_i\|g_i\|^2 - \|\bar g\|^2` (the
    reference code's biased estimate; ``unbiased=True`` divides by ``n - 1``). The reference
    code rounds to the nearest integer; ``rounding="round"`` does the same, the default
    ``"ceil"`` never asks for less than the rule.

    ``step`` takes the per-example losses and the per-example gradients (or their factored
    form, which never materializes anything), writes :math:`\bar g` into ``p.grad``, updates the
    parameters and returns the next batch size, also kept in :attr:`batch_size`::

        cabs = CABS(model.parameters(), lr=0.1)
        for x, y in adaptive_batches(dataset, cabs, epochs=10):
            y_hat, activations, linear_combs = model(x)
            losses = F.cross_entropy(y_hat, y, reduction="none")     # (n,)
            linear_grads = torch.autograd.grad(losses.sum(), linear_combs)
            cabs.step(losses, mlp_factors(activations, linear_grads))

    Args:
        params: The parameters (or ``model.named_parameters()``, needed to pass per-example
            gradients as a dict). A single parameter group.
        lr: The learning rate :math:`\alpha > 0`.
        bounds: ``(min_batch_size, max_batch_size)``, default ``(16, 2048)``.
        decay: The running averages' constant :math:`\mu \in [0, 1)`, default 0.95.
        initial_batch_size: The first batch's size; default ``bounds[0]``.
        rounding: ``"ceil"`` (default) or ``"round"`` (the reference code; half to even).
        unbiased: Estimate :math:`\operatorname{tr}\Sigma` with ``n - 1``.

    Raises:
        ValueError: If ``lr <= 0``, the bounds are out of order or below 1, ``decay`` is
            outside ``[0, 1)``, ``initial_batch_size`` is outside the bounds, ``rounding`` is
            unknown, or there is more than one parameter group.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        lr: float,
        bounds: tuple[int, int] = (16, 2048),
        decay: float = 0.95,
        initial_batch_size: int | None = None,
        rounding: str = "ceil",
        unbiased: bool = False,
    ) -> None:
        lr = _check_lr(lr)
        low, high = _check_bounds(bounds)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
        if initial_batch_size is None:
            initial_batch_size = low
        if isinstance(initial_batch_size, bool) or not isinstance(initial_batch_size, int):
            raise TypeError(f"initial_batch_size must be an integer, got {initial_batch_size!r}.")
        if not low <= initial_batch_size <= high:
            raise ValueError(
                f"initial_batch_size {initial_batch_size} lies outside the bounds {bounds!r}."
            )
        if rounding not in ("ceil", "round"):
            raise ValueError(f"rounding must be 'ceil' or 'round', got {rounding!r}.")
        defaults = {"lr": lr, "bounds": (low, high), "decay": float(decay)}
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "CABS couples one learning rate to the batch size: pass a single parameter "
                f"group, got {len(self.param_groups)}."
            )
        self.rounding = rounding
        self.unbiased = bool(unbiased)
        self.state["cabs"] = {
            "variance_avg": 0.0,
            "loss_avg": 1.0,
            "batch_size": initial_batch_size,
            "variance": math.nan,
            "loss": math.nan,
            "steps": 0,
        }

    def state_dict(self) -> dict:
        """The optimizer's state, with a copy of CABS's running averages."""
        state = super().state_dict()
        state["state"]["cabs"] = dict(state["state"]["cabs"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`."""
        super().load_state_dict(state_dict)
        self.state["cabs"] = dict(self.state["cabs"])

    @property
    def batch_size(self) -> int:
        """The size CABS asks for the next batch."""
        return int(self.state["cabs"]["batch_size"])

    @property
    def last_variance(self) -> float:
        r"""The last step's :math:`\operatorname{tr}\hat\Sigma` (before averaging)."""
        return float(self.state["cabs"]["variance"])

    @property
    def last_loss(self) -> float:
        """The last step's mean loss (before averaging)."""
        return float(self.state["cabs"]["loss"])

    @torch.no_grad()
    def _apply(self, mean: PerExampleGrads, lr: float) -> None:
        group = self.param_groups[0]
        if isinstance(mean, Mapping):
            if "param_names" not in group:
                raise TypeError(
                    "the gradients are keyed by name: construct CABS with "
                    "model.named_parameters() so they can be matched to the parameters."
                )
            names = list(group["param_names"])
            missing = [name for name in names if name not in mean]
            unknown = [key for key in mean if key not in names]
            if missing or unknown:
                raise ValueError(
                    f"the gradients must cover exactly CABS's parameters; missing {missing}, "
                    f"unknown {unknown}."
                )
            ordered = [mean[name] for name in names]
        else:
            ordered = list(mean)
        assign_grads(group["params"], ordered)
        for p in group["params"]:
            p.add_(p.grad, alpha=-lr)

    def step(  # type: ignore[override]
        self,
        losses: Tensor,
        per_example_grads: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
    ) -> int:
        r"""One SGD step on the batch's mean loss, and the batch size for the next one.

        Args:
            losses: The per-example losses :math:`L_i \geq 0` of the batch, shape ``(n,)``
                (e.g. ``reduction="none"``); only their values are used.
            per_example_grads: The gradients of the :math:`L_i`: a list or tuple in the order
                of the parameters, a dict keyed by parameter name (construct CABS with
                ``model.named_parameters()``), or their factored form (:func:`mlp_factors`, or
                a dict of :class:`LinearFactors` keyed by module name).

        Returns:
            The next batch size, an integer within the bounds.

        Raises:
            TypeError: If ``losses`` is not a tensor.
            ValueError: If ``losses`` is not a finite, non-negative ``(n,)`` tensor, its ``n``
                differs from the gradients', the gradients are not finite, the learning rate was
                set to a non-positive value, or the gradients do not match the parameters.
        """
        group = self.param_groups[0]
        lr = _check_lr(group["lr"])
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a tensor of shape (n,), got {type(losses).__name__}.")
        if losses.dim() != 1 or losses.shape[0] == 0:
            raise ValueError(
                f"losses must hold one loss per example, shape (n,), got {tuple(losses.shape)}; "
                "compute them with reduction='none'."
            )
        losses = losses.detach()
        if not bool(torch.isfinite(losses).all()):
            raise ValueError("losses hold NaN or inf: the training diverged; lower lr.")
        if bool((losses < 0).any()):
            raise ValueError(
                "CABS needs non-negative losses: its rule divides by the loss, taking the "
                f"minimum to be 0; got a loss of {losses.min().item():g}. Shift the loss."
            )
        n = _batch_size(per_example_grads)
        if n != losses.shape[0]:
            raise ValueError(
                f"losses hold {losses.shape[0]} examples but the gradients {n}: pass both for "
                "the same batch."
            )
        with torch.no_grad():
            trace, mean = _trace_and_mean(per_example_grads, self.unbiased)
        if not math.isfinite(float(trace)):
            # caught before the running average, which would stay NaN for good
            raise ValueError(
                "the per-example gradients hold NaN or inf (their variance is not finite): "
                "the training diverged; lower lr. Nothing was changed."
            )
        # assign_grads checks the gradients against the parameters: a refused step changes nothing
        self._apply(mean, lr)
        # The biased trace is a mean of squares minus a square: never negative but for rounding.
        variance = max(float(trace), 0.0)
        loss = float(losses.mean())
        state = self.state["cabs"]
        decay = group["decay"]
        state["variance_avg"] = decay * state["variance_avg"] + (1 - decay) * variance
        state["loss_avg"] = decay * state["loss_avg"] + (1 - decay) * loss
        state["variance"], state["loss"] = variance, loss
        state["steps"] += 1
        state["batch_size"] = self._next_batch_size(lr, state["variance_avg"], state["loss_avg"])
        return state["batch_size"]

    def _next_batch_size(self, lr: float, variance_avg: float, loss_avg: float) -> int:
        low, high = self.param_groups[0]["bounds"]
        if loss_avg <= 0:  # only reachable when every loss so far was 0 and decay is 0
            return high
        raw = lr * variance_avg / loss_avg
        if not math.isfinite(raw) or raw >= high:
            return high
        rounded = math.ceil(raw) if self.rounding == "ceil" else round(raw)
        return int(min(max(rounded, low), high))


# --------------------------------------------------------------------------------------------
# Batches of the size CABS asks for
# --------------------------------------------------------------------------------------------

BatchSizeSource = int | Callable[[], int] | CABS


def _check_batch_size_source(source: object) -> None:
    if isinstance(source, bool) or not (
        isinstance(source, int) or hasattr(source, "batch_size") or callable(source)
    ):
        raise TypeError(
            "batch_size must be an int, a callable returning one, or an object with a "
            f".batch_size attribute (like CABS), got {type(source).__name__}."
        )
    if isinstance(source, int):
        _read_batch_size(source)


def _read_batch_size(source: BatchSizeSource) -> int:
    if isinstance(source, int):
        size = source
    elif hasattr(source, "batch_size"):
        size = source.batch_size
    else:
        size = source()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the batch size must be a positive integer, got {size!r}.")
    return size


class AdaptiveBatchSampler(torch.utils.data.Sampler):
    """Index batches whose size is asked anew for every batch, e.g. from :class:`CABS`.

    The examples are visited in passes, each a fresh random permutation. A batch takes the next
    ``b`` indices; when the pass runs out mid-batch, the batch is completed from the next pass
    with examples it does not already hold (those are moved, not dropped), so every batch has
    exactly ``b`` distinct examples and every pass visits every example once. A batch cannot
    hold more distinct examples than the data set: ``b`` is capped at ``num_examples``.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` with ``num_workers=0`` (workers
    would fetch batches before the optimizer has chosen their size), or through
    :func:`adaptive_batches`.

    Args:
        num_examples: The size of the data set.
        batch_size: An ``int`` (a fixed batch size: the same sampling for a baseline), a
            callable returning the next size, or an object with a ``batch_size`` attribute such
            as :class:`CABS`; read each time a batch is drawn.
        epochs: Stop once ``epochs * num_examples`` examples were drawn (the last batch is
            complete, so slightly more may be); ``None`` never stops.
        generator: The random generator for the permutations.

    Attributes:
        examples_seen: How many examples the batches drawn so far held.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: BatchSizeSource,
        epochs: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
        if epochs is not None and (
            isinstance(epochs, bool)
            or not isinstance(epochs, (int, float))
            or not math.isfinite(epochs)
            or epochs <= 0
        ):
            raise ValueError(f"epochs must be a positive number or None, got {epochs!r}.")
        _check_batch_size_source(batch_size)
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.epochs = epochs
        self.generator = generator
        self.examples_seen = 0

    def __iter__(self) -> Iterator[list[int]]:
        """Yield lists of indices until ``epochs`` passes were drawn."""
        self.examples_seen = 0
        budget = math.inf if self.epochs is None else self.epochs * self.num_examples
        pending: list[int] = []  # what is left of the current pass, in order
        while self.examples_seen < budget:
            size = min(_read_batch_size(self.batch_size), self.num_examples)
            if len(pending) >= size:
                batch, pending = pending[:size], pending[size:]
            else:
                batch = pending
                taken = set(batch)
                fresh = torch.randperm(self.num_examples, generator=self.generator).tolist()
                # Complete the batch from the next pass, deferring what it already holds.
                fill = [i for i in fresh if i not in taken][: size - len(batch)]
                filled = set(fill)
                batch = batch + fill
                pending = [i for i in fresh if i not in filled]
            self.examples_seen += len(batch)
            yield batch


def adaptive_batches(
    dataset: torch.utils.data.TensorDataset | Sequence[Tensor],
    batch_size: BatchSizeSource,
    epochs: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Batches of a tensor data set in the sizes an optimizer asks for.

    The batches are drawn as by :class:`AdaptiveBatchSampler`, indexing the tensors directly
    (faster than a ``DataLoader`` for data in memory).

    Args:
        dataset: A ``TensorDataset`` or a tuple of tensors with the same first dimension.
        batch_size: An ``int``, a callable, or an object with ``batch_size`` such as
            :class:`CABS`; read before every batch.
        epochs: Stop after about this many passes over the data; ``None`` never stops.
        generator: The random generator for the permutations.

    Yields:
        Tuples with one tensor per data tensor, each of shape ``(b, ...)``.
    """
    if isinstance(dataset, torch.utils.data.TensorDataset):
        tensors = list(dataset.tensors)
    elif isinstance(dataset, (list, tuple)) and all(isinstance(t, Tensor) for t in dataset):
        tensors = list(dataset)
    else:
        raise TypeError(
            f"dataset must be a TensorDataset or a tuple of tensors, got {type(dataset).__name__}."
        )
    if not tensors:
        raise ValueError("dataset holds no tensors.")
    n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise ValueError("the data tensors must share their first (example) dimension.")
    sampler = AdaptiveBatchSampler(n, batch_size, epochs, generator)
    for indices in sampler:
        index = torch.tensor(indices, device=tensors[0].device)
        yield tuple(t[index] for t in tensors)
