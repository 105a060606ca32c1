r"""Norms and weighted sums of a whole model: linear layers that read one input share its work.

A transformer block applies its query, key and value projections to the same tensor
:math:`A`. Example :math:`i`'s squared gradient norm over such a set of layers :math:`l` is

.. math::

    \sum_l \Big\|\sum_t G_{l,t} A_t^\top\Big\|_F^2
    = \sum_{t,s} (A_t \cdot A_s) \sum_l (G_{l,t} \cdot G_{l,s}),

so the Gram matrix :math:`A A^\top` is formed once and the layers' output Grams are added up
before the one batched dot: :math:`T^2 (d_{in} + \sum_l d_{out,l})` multiply-adds per example
instead of :math:`\sum_l T^2 (d_{in} + d_{out,l})`. For q, k, v of width 128 at
:math:`T = 64` that is :math:`T^2 \cdot 512` against three materialized weight gradients,
:math:`3 T \cdot 128^2`: a third less (:func:`~goodfellow.layers.position_norms.gram_sq_norms`
forms all of both Grams at this :math:`T`, and only the blocks on and above their diagonal
from 129 positions on).

The clipped mean's weighted sums :math:`\sum_i w_i g_i` share the input the same way: the
rescaled :math:`w A` is formed once for all of them (:func:`weighted_sums`).

Index letters: ``n`` example, ``t`` and ``s`` position, ``l`` layer.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from torch import Tensor

from goodfellow.layers.embedding import EmbeddingGradients, shared_gradient_sq_norms
from goodfellow.layers.linear import LinearFactors, _layer_weighted_sum
from goodfellow.layers.position_norms import bias_sq_norms, gram_count, gram_sq_norms
from goodfellow.layers.routes import fastest

__all__ = ["summed_sq_norms", "weighted_sums"]


def summed_sq_norms(layers: Sequence) -> Tensor:
    r""":math:`\sum_l \|g_{l,i}\|^2` over all ``layers`` (any rules' gradients), ``(n,)``.

    Linear layers (:class:`goodfellow.LinearFactors`) whose inputs are the same tensor and
    that are applied at several positions are taken together, by the shared Gram above or one
    by one, whichever is faster (timed once per shape where neither count is four times the
    other); so are embeddings whose output gradients are the same tensor (a token and a
    position embedding added together:
    :func:`goodfellow.layers.embedding.shared_gradient_sq_norms`); every other layer gives its
    own ``sq_norms()``. The same numbers as adding up each
    layer's ``sq_norms()``, up to the order of the sums.

    Args:
        layers: Checked layer gradients of one batch (``sources._layers``).

    Returns:
        Tensor of shape ``(n,)``.
    """
    groups: dict[Hashable, list[LinearFactors]] = {}
    embeddings: dict[Hashable, list[EmbeddingGradients]] = {}
    alone = []
    for layer in layers:
        if isinstance(layer, LinearFactors) and layer.inputs.shape[1] > 1:
            groups.setdefault(_same_tensor_key(layer.inputs), []).append(layer)
        elif isinstance(layer, EmbeddingGradients):
            embeddings.setdefault(_same_tensor_key(layer.grad_outputs), []).append(layer)
        else:
            alone.append(layer)
    parts = [layer.sq_norms() for layer in alone]
    for group in groups.values():
        parts.append(group[0].sq_norms() if len(group) == 1 else _group_sq_norms(group))
    for same_gradient in embeddings.values():
        parts.append(
            same_gradient[0].sq_norms() if len(same_gradient) == 1
            else shared_gradient_sq_norms(same_gradient)
        )  # fmt: skip
    return sum(parts)


def _same_tensor_key(t: Tensor) -> Hashable:
    """Equal for two views of the same memory with the same layout: the same numbers."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _group_sq_norms(group: list[LinearFactors]) -> Tensor:
    """The squared norms of layers reading one input ``(n, T, d_in)``: shared Gram or one by one."""
    A = group[0].inputs  # (n, T, d_in)
    n, positions, d_in = A.shape
    widths = [layer.grad_outputs.shape[2] for layer in group]
    shared = gram_count(positions, d_in, *widths)
    separate = sum(
        min(gram_count(positions, d_in, d_out), positions * d_in * d_out) for d_out in widths
    )
    routes = {
        "shared gram": lambda: _shared_gram_sq_norms(group),
        "per layer": lambda: sum(layer.sq_norms() for layer in group),
    }
    if 4 * shared <= separate:
        return routes["shared gram"]()
    if 4 * separate <= shared:
        return routes["per layer"]()
    key = ("shared-input sq norms", tuple(A.shape), tuple(widths), A.dtype, A.device)
    return fastest(key, routes, A.device)


def _shared_gram_sq_norms(group: list[LinearFactors]) -> Tensor:
    r"""``einsum("nts,nts->n", sum_l G_l G_l^T, A A^T)`` plus the biases' :math:`\|\sum_t G\|^2`."""
    A, Gs = group[0].inputs, [layer.grad_outputs for layer in group]
    if all(layer.bias for layer in group):
        return gram_sq_norms(A, Gs, bias=True)  # (n,), the biases from the summed Gram
    weight = gram_sq_norms(A, Gs)  # (n,)
    return sum((bias_sq_norms(layer.grad_outputs) for layer in group if layer.bias), weight)


def weighted_sums(
    layers: Sequence, weights: Tensor, done: Mapping[int, list[Tensor]]
) -> list[list[Tensor]]:
    r""":math:`\sum_i w_i g_i` of every layer, in order; layers reading one input scale it once.

    A linear layer's weighted sum is :math:`G^\top (w A)` or :math:`(w G)^\top A`, whichever
    scales fewer numbers (``linear._layer_weighted_sum``). Layers that read the same
    :math:`A` (q, k, v) share :math:`w A` where it is narrower than their outputs together:
    one scaling of ``(n, T, d_in)`` instead of one of ``(n, T, d_out)`` per layer. Every other
    layer gives its own ``weighted_sum``.

    Args:
        layers: Checked layer gradients of one batch (``sources._layers``).
        weights: :math:`w`, shape ``(n,)``.
        done: The sums of some layers, by index, already computed (they are kept).

    Returns:
        One list of ``param.shape`` tensors per layer.
    """
    groups: dict[Hashable, list[int]] = {}
    for k, layer in enumerate(layers):
        if k not in done and isinstance(layer, LinearFactors):
            groups.setdefault(_same_tensor_key(layer.inputs), []).append(k)
    sums = dict(done)
    for members in groups.values():
        group = [layers[k] for k in members]
        A = group[0].inputs  # (n, T, d_in)
        if len(group) > 1 and A.shape[2] <= sum(layer.grad_outputs.shape[2] for layer in group):
            scaled = A * weights[:, None, None]  # (n, T, d_in), once for the group
            for k, layer in zip(members, group):
                sums[k] = _layer_weighted_sum(layer, weights, scaled)
    return [sums[k] if k in sums else layer.weighted_sum(weights) for k, layer in enumerate(layers)]
