r"""The projected comparison behind the recorder's accounting check, for linear and conv rules.

Forming :math:`\sum_i g_i` of a layer to compare it with the gradient autograd gave the
parameter would cost a batch weight gradient. Projected on fixed random directions ``u``,
``v`` both sides are cheap: :math:`\sum_{n,t} (G_{nt} \cdot v)(A_{nt} \cdot u)` against
:math:`v^\top W u` costs :math:`O(nT(d_{in} + d_{out}))`, and a parameter used outside its
module changes the projection with probability one (:mod:`goodfellow._accounting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from goodfellow.layers.linear import LinearFactors


_DIRECTIONS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _random_directions(d_in: int, d_out: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``u`` of size ``d_in`` and ``v`` of size ``d_out``, the same on every call (cached)."""
    key = (d_in, d_out, like.dtype, like.device)
    if key not in _DIRECTIONS:
        generator = torch.Generator(device=like.device).manual_seed(0)
        u = torch.randn(d_in, generator=generator, device=like.device, dtype=like.dtype)
        v = torch.randn(d_out, generator=generator, device=like.device, dtype=like.dtype)
        if len(_DIRECTIONS) > 256:  # a long run over many shapes: start over
            _DIRECTIONS.clear()
        _DIRECTIONS[key] = (u, v)
    return _DIRECTIONS[key]


def _projected_discrepancy(
    layer: LinearFactors, totals: Sequence[Tensor | None], scale: int, groups: int
) -> list[float]:
    """The projected comparison of :meth:`LinearFactors.sum_discrepancy`.

    ``groups`` blocks of rows (a grouped convolution's) share the directions, and the weight
    gradient is their ``(groups, d_out, d_in)`` stack.
    """
    A, G, _ = layer
    u, v = _random_directions(A.shape[-1], G.shape[-1], A)
    # as products with the transposed factors: no copy of a strided (unfolded) factor
    gv = torch.matmul(v, G.transpose(-1, -2))  # (n, t)
    au = torch.matmul(u, A.transpose(-1, -2))  # (n, t)
    return _compare_projections(gv, au, u, v, totals, scale, groups)


def _compare_projections(
    gv: Tensor,
    au: Tensor,
    u: Tensor,
    v: Tensor,
    totals: Sequence[Tensor | None],
    scale: int,
    groups: int,
) -> list[float]:
    r"""Relative differences of the projected per-example sums from the projected totals.

    :math:`\sum (G v)(A u)` against :math:`v^\top W u` and :math:`\sum G v` against
    :math:`v^\top b`, the weight gradient read as ``(groups, d_out, d_in)``.
    """
    products = gv * au  # (n, t)
    predicted = [products.sum(), gv.sum()]  # weight, bias
    sizes = [products.abs().sum(), gv.abs().sum()]
    errors, scales = [], []
    for k, total in enumerate(totals):
        if total is None:
            continue
        blocks = total.reshape(groups, v.shape[0], -1).to(u.dtype)  # (g, o, i), or (g, o, 1)
        projected = torch.matmul(v, blocks)  # (g, i): v^T W per group
        actual = (projected @ u).sum() if k == 0 else projected.sum()
        errors.append((predicted[k] / scale - actual).abs())
        scales.append(sizes[k] / scale + actual.abs())
    if not errors:
        return [0.0 for _ in totals]
    ratios = (torch.stack(errors) / torch.stack(scales).clamp(min=torch.finfo(u.dtype).tiny))
    it = iter(ratios.tolist())  # one transfer for all the layer's parameters
    return [0.0 if total is None else next(it) for total in totals]
