r"""Per-example gradients of linear layers by Goodfellow's trick, and the two references.

For a linear layer :math:`Z = A W^\top + b` applied to a batch, example :math:`i` only touches
row :math:`i` of :math:`A` and :math:`Z`. Its own loss :math:`L_i` therefore has the gradient

.. math::

    \frac{\partial L_i}{\partial W} = G_i A_i^\top, \qquad
    \frac{\partial L_i}{\partial b} = G_i, \qquad
    G_i = \frac{\partial L_i}{\partial Z_i},

an outer product of a ``(d_out,)`` and a ``(d_in,)`` vector. Autograd hands out
:math:`\partial \mathcal{L} / \partial Z` for the batch loss :math:`\mathcal{L}`: with
``reduction="sum"`` (:math:`\mathcal{L} = \sum_i L_i`) its row ``i`` is :math:`G_i`; with
``reduction="mean"`` (:math:`\mathcal{L} = \frac1n \sum_i L_i`) it is :math:`G_i / n`, so it
has to be multiplied by the batch size :math:`n` first. All per-example outer products are then
one batched matrix product, ``einsum("no,ni->noi")``.

The module also holds the two references every result of the package is tested against: the
naive loop (one backward per example) and ``torch.func`` (``vmap(grad(...))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from goodfellow._autocast import without_autocast
from goodfellow._backprop_checks import _check_not_forward_outputs, _check_out
from goodfellow._checks import (
    LossFunction,
    check_model_batch,
    check_plain_mean,
    check_same_kind,
    loss_reduction_of,
)
from goodfellow.layers.base import norm_from_squares
from goodfellow.layers.linear import LinearFactors, _batched_outer, outer_sq_from_row_norms
from goodfellow.reduction import batch_size_factor

__all__ = [
    "check_layer_lists",
    "goodfellow_backprop",
    "mlp_factors",
    "per_example_grads",
    "per_example_norms",
]


def check_layer_lists(
    activations: Sequence[Tensor], linear_grads: Sequence[Tensor], *, allow_empty: bool = False
) -> int:
    """Check that two per-layer lists describe one batch through one chain of linear layers.

    Args:
        activations: ``activations[l]`` of shape ``(n, d_l)``.
        linear_grads: ``linear_grads[l]`` of shape ``(n, d_{l+1})``.
        allow_empty: Accept a batch of ``n = 0`` (a data-parallel rank's share may be empty).

    Returns:
        The batch size ``n``.

    Raises:
        TypeError: If the lists or their entries are not lists and tensors.
        ValueError: If their lengths, ranks, dtypes, devices, batch sizes or widths do not fit
            one MLP, the batch is empty, or an entry of ``linear_grads`` is a layer's output
            :math:`Z` rather than its gradient (told apart by autograd's graph; tensors without
            a graph cannot be checked).
    """
    for name, seq in (("activations", activations), ("linear_grads", linear_grads)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{name} must be a list or tuple of tensors, one per linear layer, "
                f"got {type(seq).__name__}."
            )
    if len(activations) != len(linear_grads):
        raise ValueError(
            f"activations and linear_grads must have one entry per linear layer each, got "
            f"{len(activations)} and {len(linear_grads)}."
        )
    if len(activations) == 0:
        raise ValueError("activations and linear_grads are empty: the model has no linear layer.")
    for layer, (a, g) in enumerate(zip(activations, linear_grads), start=1):
        for name, t in (("activations", a), ("linear_grads", g)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{name}[{layer - 1}] (layer {layer}) must be a torch.Tensor, "
                    f"got {type(t).__name__}."
                )
            if t.dim() != 2:
                raise ValueError(
                    f"{name}[{layer - 1}] (layer {layer}) must have shape (n, features), got "
                    f"shape {tuple(t.shape)}; for inputs with extra dimensions use "
                    "goodfellow.PerExampleGradients."
                )
        check_same_kind(
            a, f"layer {layer}: activations", g, "linear_grads",
            "compute both in one dtype on one device",
        )
    n = activations[0].shape[0]
    if n == 0 and not allow_empty:
        raise ValueError("the batch is empty (n = 0): per-example gradients need an example.")
    for layer, (a, g) in enumerate(zip(activations, linear_grads), start=1):
        if a.shape[0] != n or g.shape[0] != n:
            raise ValueError(
                f"layer {layer}: batch sizes differ (activations {a.shape[0]}, linear_grads "
                f"{g.shape[0]}, but layer 1 has {n}); all tensors must come from one batch."
            )
    for layer in range(1, len(activations)):
        d_out, d_next_in = linear_grads[layer - 1].shape[1], activations[layer].shape[1]
        if d_out != d_next_in:
            raise ValueError(
                f"layer {layer} has {d_out} outputs (linear_grads[{layer - 1}]) but layer "
                f"{layer + 1} has {d_next_in} inputs (activations[{layer}]): the lists do not "
                "describe one chain of layers; pass them in the order the MLP returns them."
            )
    _check_not_forward_outputs(activations, linear_grads)
    return n


@without_autocast
def goodfellow_backprop(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    loss_reduction: str = "sum",
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    r"""Per-example gradients of every weight and bias of an MLP, by Goodfellow's trick.

    The trick is one einsum per layer, ``"no,ni->noi"`` (``n`` example, ``o`` output feature,
    ``i`` input feature): :math:`\partial L_i/\partial W_l = c\,G_{l,i} A_{l-1,i}^\top` and
    :math:`\partial L_i/\partial b_l = c\,G_{l,i}`, with :math:`c = 1` for ``"sum"`` and
    :math:`c = n` for ``"mean"``.

    Args:
        activations: Inputs of the linear layers, ``activations[l]`` of shape ``(n, d_l)``, as
            returned by :class:`goodfellow.MLP`.
        linear_grads: ``torch.autograd.grad(loss, linear_combs)``, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})``. Pass ``create_graph=True`` there to differentiate the result again.
            The outputs ``linear_combs`` themselves are refused where autograd's graph shows
            them to be forward tensors (not when they were detached, nor for a one-layer model
            on an input without a graph).
        loss_reduction: How the batch loss was reduced over examples: ``"sum"``
            (:math:`\sum_i L_i`, the per-example gradients sum to the batch gradient) or
            ``"mean"`` (:math:`\frac1n\sum_i L_i`, they average to it).
        out: Optional list of preallocated tensors in the layout of the result; the results are
            written into them (saves the allocation when called every step). Not allowed when
            the result needs to be differentiable.

    Returns:
        ``[gW_1, gb_1, ..., gW_L, gb_L]``: ``gW_l`` of shape ``(n, d_l, d_{l-1})`` (PyTorch's
        ``(out, in)`` layout) and ``gb_l`` of shape ``(n, d_l)``; row ``i`` is the gradient of
        example ``i``'s own loss :math:`L_i`. In the order of ``model.parameters()``. New
        tensors (or those of ``out``), never the inputs themselves.

    Raises:
        TypeError: If the lists or their entries are not lists and tensors.
        ValueError: If their lengths, ranks, batch sizes or widths do not fit one MLP, the batch
            is empty, ``loss_reduction`` is unknown, or ``out`` does not fit the result (count,
            shape, dtype, device, contiguity), shares memory, or is given for a differentiable
            result.
    """
    n = check_layer_lists(activations, linear_grads)
    scale = batch_size_factor(loss_reduction, n)
    if out is not None:
        out = _check_out(out, activations, linear_grads)
    # Without create_graph upstream the linear grads are constants; differentiating the result
    # through the activations alone would give a silently partial second derivative, so the result
    # is made a plain tensor instead (and in-place writes into `out` become legal).
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in linear_grads)
    with torch.set_grad_enabled(differentiable):
        return _outer_products(activations, linear_grads, scale, out)


def _outer_products(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    scale: int,
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    grads: list[Tensor] = []
    for layer, (a, g) in enumerate(zip(activations, linear_grads)):
        g = g * scale if scale != 1 else g  # (n, o): example i's own dL_i/dZ_i
        if out is None:
            grads.append(_batched_outer(g, a))  # (n, o, i)
            # a copy, never the caller's tensor: clipping the result in place must not change
            # linear_grads (nor fail on autograd's expanded gradient of a sum)
            grads.append(g if scale != 1 else g.clone())  # (n, o)
        else:
            grads.append(_batched_outer(g, a, out=out[2 * layer]))  # (n, o, i)
            grads.append(out[2 * layer + 1].copy_(g))  # (n, o)
    return grads


@without_autocast
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
        One :class:`goodfellow.LinearFactors` per layer, each with ``T = 1`` position.

    Raises:
        TypeError: If the arguments are not lists of tensors.
        ValueError: If the lists do not describe one batch through one chain of layers (see
            :func:`goodfellow.goodfellow_backprop`).
    """
    # the same checks as goodfellow_backprop: one chain of (n, features) layers, one batch;
    # a batch may be empty here, as a data-parallel rank's share can be (the statistics refuse
    # to average over no example unless other ranks hold some)
    n = check_layer_lists(activations, linear_grads, allow_empty=True)
    scale = batch_size_factor(loss_reduction, n)
    return [
        LinearFactors(a[:, None], g[:, None] * scale if scale != 1 else g[:, None], True)
        for a, g in zip(activations, linear_grads)
    ]  # one position each: (n, 1, d)


@without_autocast
def per_example_norms(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    loss_reduction: str = "sum",
) -> Tensor:
    r"""L2 norms of each example's whole gradient, without materializing the gradients.

    The Frobenius norm of an outer product factorizes,
    :math:`\|G_i A_i^\top\|^2 = \|G_i\|^2 \|A_i\|^2`, so with the bias

    .. math::

        \|g_i\|^2 = c^2 \sum_l \|G_{l,i}\|^2 \left(\|A_{l-1,i}\|^2 + 1\right),

    where :math:`G_{l,i}` is row ``i`` of ``linear_grads[l-1]``, :math:`A_{l-1,i}` row ``i`` of
    ``activations[l-1]``, and :math:`c` is
    :func:`goodfellow.batch_size_factor` (``1`` for ``"sum"``,
    :math:`n` for ``"mean"``). This costs :math:`O(n \sum_l (d_{l-1} + d_l))` instead of the
    :math:`O(nP)` of materializing the gradients.

    Args:
        activations: As for :func:`goodfellow_backprop`, ``activations[l]`` of shape
            ``(n, d_l)``.
        linear_grads: As for :func:`goodfellow_backprop`, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})``.
        loss_reduction: ``"sum"`` or ``"mean"``, as for :func:`goodfellow_backprop`.

    Returns:
        Tensor of shape ``(n,)``: :math:`\|\nabla_\theta L_i\|_2` over all weights and biases.
        Differentiable when ``linear_grads`` were computed with ``create_graph=True`` (with
        derivative 0 at an example whose gradient is 0, as for ``torch.linalg.vector_norm``).
    """
    n = check_layer_lists(activations, linear_grads)
    scale = batch_size_factor(loss_reduction, n)
    # The linear rule's factored norm at one position, ||G_i||^2 (||A_i||^2 + 1), for all layers
    # at once: the rows' squared norms stacked, then four kernels, not four per layer (wrapping
    # each layer in LinearFactors instead cost 0.66 ms for nine layers of 64 at n = 256, this
    # 0.19). The factor n goes onto the norms rather than onto every G: fewer kernels.
    grad_sq = torch.stack([torch.linalg.vecdot(g, g) for g in linear_grads])  # (L, n)
    input_sq = torch.stack([torch.linalg.vecdot(a, a) for a in activations])  # (L, n)
    norms = norm_from_squares(outer_sq_from_row_norms(grad_sq, input_sq, True).sum(dim=0))  # (n,)
    return norms * scale if scale != 1 else norms


@without_autocast
def per_example_grads(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_reduction: str | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Per-example gradients of a :class:`goodfellow.MLP` in one call.

    Runs the forward, takes ``torch.autograd.grad`` of the batch loss w.r.t. the linear
    combinations and applies :func:`goodfellow_backprop`.

    Args:
        model: A :class:`goodfellow.MLP` (anything returning ``(y, activations, linear_combs)``).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` over the whole batch.
        inputs: Batch of inputs, shape ``(n, d_0)``.
        targets: Batch of targets, shape ``(n, ...)``.
        loss_reduction: ``"sum"`` or ``"mean"``; by default read off ``loss_fn.reduction``
            (torch's loss modules carry it; ``nn.KLDivLoss(reduction="batchmean")``, the sum
            divided by ``n``, is ``"mean"``). A plain function has no such attribute: then it
            must be given, since guessing wrong would scale every gradient by ``n``.
        create_graph: Keep the graph so the result can be differentiated again.

    Returns:
        ``[gW_1, gb_1, ..., gW_L, gb_L]`` as in :func:`goodfellow_backprop`.

    Raises:
        TypeError: If the model does not return ``(y, activations, linear_combs)``, or the
            reduction cannot be read off ``loss_fn``.
        ValueError: If a layer's output does not require grad (forward under
            ``torch.no_grad()``, or frozen parameters), the reduction is unknown or
            contradicts ``loss_fn.reduction``, or
            ``loss_fn`` is a class-weighted ``"mean"`` or ignores some targets (those means are
            not :math:`\frac1n \sum_i L_i`).
    """
    check_model_batch(model, inputs, targets)
    output = model(inputs)
    if not (isinstance(output, tuple) and len(output) == 3):
        raise TypeError(
            "per_example_grads needs a model whose forward returns (y, activations, "
            "linear_combs), like goodfellow.MLP; for other models use "
            "goodfellow.PerExampleGradients."
        )
    prediction, activations, linear_combs = output
    for layer, z in enumerate(linear_combs, start=1):
        if not z.requires_grad:
            raise ValueError(
                f"the output of linear layer {layer} does not require grad, so autograd cannot "
                "give the loss's gradient w.r.t. it: run per_example_grads with gradients "
                "enabled (not under torch.no_grad() or torch.inference_mode()) on a model "
                "whose parameters are trainable; for a model with frozen layers use "
                "goodfellow.PerExampleGradients."
            )
    if not create_graph:
        activations = [a.detach() for a in activations]
    loss_reduction = loss_reduction_of(loss_fn, loss_reduction)
    if loss_reduction == "mean":
        check_plain_mean(loss_fn, targets)
    loss = loss_fn(prediction, targets)
    linear_grads = torch.autograd.grad(loss, linear_combs, create_graph=create_graph)
    return goodfellow_backprop(activations, linear_grads, loss_reduction)
