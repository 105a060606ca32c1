r"""The clipped sum in one pass over the layers whose norms form the per-example gradients.

The clipped sum :math:`\sum_i w_i g_i` with :math:`w_i = \min(1, C/\|g_i\|)` needs each
example's norm over *all* layers before any weight is known. A linear layer applied at many
positions whose norms are cheapest from its formed per-example gradients
:math:`g_i = \sum_t G_{i,t} A_{i,t}^\top` (the "materialized" route of
:mod:`goodfellow.layers.position_norms`: ``T d_in d_out`` per example, below the Gram route's
``T^2 (d_in + d_out)``) would form them for the norms, drop them, and compute the weighted sum
as a second product of the same size, :math:`(w G)^\top A`.

Formed a chunk of examples at a time for all such layers together, the chunk's norms are
complete as soon as its gradients are (the other layers' norms come first, for the whole
batch), so are its weights, and the weighted sum of the chunk is one matrix-vector product
over the gradients just formed:

.. math::

    \sum_i w_i g_i = \sum_{\text{chunks } c} \sum_{i \in c} w_i g_i,

the second product replaced by one read of each chunk. Memory: one chunk, about
``position_norms._CHUNK_BYTES`` of per-example gradients of all these layers together (the
budget of the norms' formed route, one layer at a time). Where a single example's gradients of
these layers exceed it, the clipped sum takes two passes instead (norms, then each layer's
weighted sum), so that the memory stays within the budget for models of any size.

Index letters: ``n`` example, ``c`` example of a chunk, ``o`` output and ``i`` input feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from goodfellow.layers import position_norms
from goodfellow.layers.base import norm_from_squares
from goodfellow.layers.linear import LinearFactors, _batched_outer
from goodfellow.layers.position_norms import forms_its_norms, sum_of_squares
from goodfellow.layers.routes import forced_route
from goodfellow.layers.shared_inputs import summed_sq_norms

__all__ = ["SEPARATE", "norms_and_formed_sums"]

SEPARATE = "separate clipped sum"
"""Route name that turns the one-pass sum off (``goodfellow.layers.routes.forced``, for tests):
every layer's norms first, then every layer's weighted sum."""

def norms_and_formed_sums(
    layers: Sequence, max_norm: float, clip_factors: Callable[[Tensor, float], Tensor]
) -> tuple[Tensor, dict[int, list[Tensor]]]:
    r"""Every example's gradient norm, and the clipped sums of the layers formed on the way.

    Args:
        layers: Checked layer gradients of one batch (``sources._layers``).
        max_norm: The clipping norm :math:`C`.
        clip_factors: ``(norms, C) -> (n,)`` clipping factors :math:`\min(1, C/\|g_i\|)`.

    Returns:
        The norms ``(n,)`` and, for each index of ``layers`` whose per-example gradients were
        formed here, its ``[weight_sum (o, i), bias_sum (o,)]`` (``bias_sum`` where it has a
        bias) weighted by the clipping factors. The other layers' sums are left to their own
        ``weighted_sum``.
    """
    formed = [
        k for k, layer in enumerate(layers)
        if isinstance(layer, LinearFactors) and _is_formed(layer)
    ]  # fmt: skip
    differentiable = any(t.requires_grad for k in formed for t in layers[k][:2])
    if not formed or differentiable or layers[0].batch_size == 0 or forced_route() == SEPARATE:
        return norm_from_squares(summed_sq_norms(layers)), {}
    group = [layers[k] for k in formed]
    A0 = group[0].inputs
    # one example's formed gradients of all these layers must fit the budget: a large model
    # would otherwise hold a whole example's worth, O(P), where two passes hold one layer's
    per_example = sum(L.grad_outputs.shape[2] * L.inputs.shape[2] for L in group)
    chunk_bytes = position_norms._CHUNK_BYTES
    if per_example * A0.element_size() > chunk_bytes:
        return norm_from_squares(summed_sq_norms(layers)), {}
    rest = [layer for k, layer in enumerate(layers) if k not in formed]  # a few layers
    n = A0.shape[0]
    # everything but the formed weights, for the whole batch first: the other layers and the
    # formed layers' biases
    squares = summed_sq_norms(rest) if rest else A0.new_zeros(n)  # (n,)
    # each bias's per-example gradient sum_t G_t, formed once: squared here, weighted below
    bias_grads = {k: L.grad_outputs.sum(dim=1) for k, L in zip(formed, group) if L.bias}  # (n, o)
    squares = squares + sum(sum_of_squares(g) for g in bias_grads.values())
    sums = [A0.new_zeros((layer.grad_outputs.shape[2], layer.inputs.shape[2])) for layer in group]
    step = chunk_bytes // (per_example * A0.element_size())  # examples per chunk, >= 1
    norms, factors = [], []
    for start in range(0, n, step):
        stop = min(start + step, n)
        grads = [_batched_outer(L.grad_outputs[start:stop], L.inputs[start:stop]) for L in group]
        chunk_norms = norm_from_squares(
            squares[start:stop] + sum(sum_of_squares(g) for g in grads)
        )  # (c,)
        w = clip_factors(chunk_norms, max_norm).to(A0.dtype)  # (c,)
        for total, g in zip(sums, grads):
            total.view(-1).addmv_(g.flatten(1).T, w)  # (o i,) += (o i, c) @ (c,)
        norms.append(chunk_norms)
        factors.append(w)
    w = torch.cat(factors)  # (n,)
    results = {
        k: [total, w @ bias_grads[k]] if k in bias_grads else [total]  # (o, i), (o,)
        for k, total in zip(formed, sums)
    }
    return torch.cat(norms), results


def _is_formed(layer: LinearFactors) -> bool:
    """A layer at several positions whose norms are cheapest from its formed gradients."""
    return layer.inputs.shape[1] > 1 and forms_its_norms(layer.inputs, layer.grad_outputs)
