r"""The argument checks of :func:`goodfellow.goodfellow_backprop` that concern more than shapes.

Kept apart from :mod:`goodfellow.backprop` so that the module a reader learns the trick from
holds the formula: here are the refusal of layer outputs passed where their gradients belong
(told apart by autograd's graph) and the checks of preallocated ``out=`` buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from goodfellow._buffer_checks import aliased_buffer, check_buffer


def _check_not_forward_outputs(
    activations: Sequence[Tensor], linear_grads: Sequence[Tensor]
) -> None:
    r"""Refuse the layer outputs :math:`Z_l` passed where their gradients belong.

    ``goodfellow_backprop(activations, linear_combs)`` has the right shapes and used to return
    numbers. Autograd's graph tells the two apart, one node deep:

    * the forward computed ``activations[l + 1]`` from :math:`Z_l` (``act(Z_l)``, or
      :math:`Z_l` itself), before any gradient existed: a tensor whose node feeds the node of
      ``activations[l + 1]`` is a forward tensor, never a gradient;
    * :math:`Z_l = A_l W_l^\top + b_l` is computed directly from ``activations[l]``, while the
      gradient :math:`\partial\mathcal L/\partial Z_l` is computed from later tensors (the
      loss's gradient, :math:`W_{l+1}`, :math:`\operatorname{act}'(Z_l)`), also with
      ``create_graph=True``.

    Not detectable: tensors without a graph (detached, or computed under ``torch.no_grad()``),
    and a one-layer model whose input neither requires grad nor has a graph of its own.
    """
    for layer, g in enumerate(linear_grads):
        node = g.grad_fn
        if node is None:
            continue  # autograd.grad's results without create_graph: no history to compare
        why = None
        if layer + 1 < len(activations):
            following = activations[layer + 1].grad_fn
            if following is node or (
                following is not None and any(fn is node for fn, _ in following.next_functions)
            ):
                why = f"activations[{layer + 1}] was computed from it in the forward"
        a = activations[layer]
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            if (a.grad_fn is not None and fn is a.grad_fn) or getattr(fn, "variable", None) is a:
                why = f"it was computed from activations[{layer}] in the forward"
        if why is not None:
            raise ValueError(
                f"linear_grads[{layer}] (layer {layer + 1}) is not a gradient: {why}, so it is "
                f"the layer's output Z (linear_combs[{layer}]), not dLoss/dZ. Pass "
                "torch.autograd.grad(loss, linear_combs), the gradients of the loss w.r.t. the "
                "layer outputs."
            )


def _check_out(
    out: Sequence[Tensor], activations: Sequence[Tensor], linear_grads: Sequence[Tensor]
) -> list[Tensor]:
    """Check preallocated output buffers against the shapes goodfellow_backprop will produce."""
    if isinstance(out, Tensor) or not isinstance(out, Sequence):
        raise TypeError(f"out must be a list of tensors, got {type(out).__name__}.")
    if len(out) != 2 * len(activations):
        raise ValueError(
            f"out must hold 2 tensors per layer ({2 * len(activations)}), got {len(out)}."
        )
    if torch.is_grad_enabled() and any(g.requires_grad for g in linear_grads):
        raise ValueError(
            "out= cannot be used when linear_grads require grad (create_graph=True): "
            "in-place writes are not differentiable; drop out= to get a differentiable result."
        )
    n = activations[0].shape[0]
    for layer, (a, g) in enumerate(zip(activations, linear_grads)):
        weight_shape, bias_shape = (n, g.shape[1], a.shape[1]), (n, g.shape[1])
        for k, shape in ((2 * layer, weight_shape), (2 * layer + 1, bias_shape)):
            check_buffer(out[k], f"out[{k}]", shape, g.dtype, g.device)
    # a buffer written early that another buffer or a later layer's input lives in would
    # silently change numbers written or read afterwards
    aliased = aliased_buffer(out, [*activations, *linear_grads])
    if aliased is not None:
        raise ValueError(
            f"out[{aliased}] shares memory with another entry of out or with activations or "
            "linear_grads; every result needs a buffer of its own."
        )
    return list(out)
