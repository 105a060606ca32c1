r"""Sums across data-parallel workers, for the statistics of :mod:`goodfellow.statistics`.

With ``group=`` a statistic is the one of the union of all ranks' examples. Every statistic is a
sum over examples divided by a count, so each rank forms its own sums and they are all-reduced,
in one collective of their concatenation: :math:`O(P)` numbers, never a per-example tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from goodfellow.layers.shared_inputs import weighted_sums
from goodfellow.sources import _example_tensor


def _all_reduce(tensors: list[Tensor], group: object) -> list[Tensor]:
    """Sum each tensor over the ranks of ``group`` (one all-reduce of their concatenation)."""
    if group is None:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (P,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    sizes = [t.numel() for t in tensors]
    return [piece.reshape(t.shape) for piece, t in zip(torch.split(flat, sizes), tensors)]


def _sums(
    layers: list, weights: Tensor | None, group: object, *extra: Tensor,
    done: dict[int, list[Tensor]] | None = None,
) -> tuple:
    r""":math:`\sum_i w_i g_i` per layer (``w = 1`` when ``None``), the global ``n``, ``extra``.

    All summed over the ranks of ``group`` in one all-reduce. ``done``: the local sums of some
    layers, by index, already computed (the clipped sum's formed layers).
    """
    like = _example_tensor(layers[0])
    n = layers[0].batch_size
    if weights is None:
        weights = torch.ones(n, dtype=like.dtype, device=like.device)  # (n,)
    per_layer = weighted_sums(layers, weights, done or {})
    flat = [t for results in per_layer for t in results]
    if group is None:  # no tensor for the count: no host sync, and meta tensors work
        sums, total, extra = flat, n, list(extra)
    else:
        count = torch.tensor(float(n), dtype=like.dtype, device=like.device)
        reduced = _all_reduce([*flat, count, *extra], group)
        sums, total = reduced[: len(flat)], int(round(float(reduced[len(flat)])))
        extra = reduced[len(flat) + 1 :]
    it = iter(sums)
    return [[next(it) for _ in results] for results in per_layer], total, extra


def _global_count(layers: list, group: object) -> int:
    """The number of examples over all ranks."""
    if group is None:
        return layers[0].batch_size
    like = _example_tensor(layers[0])
    count = torch.tensor(float(layers[0].batch_size), dtype=like.dtype, device=like.device)
    return int(round(float(_all_reduce([count], group)[0])))



def _mean_over_ranks(means: list[Tensor], counts: list[int], group: object) -> list[Tensor]:
    """Means over each rank's examples -> means over all ranks' examples, one all-reduce.

    Each mean is weighted by the number of terms it averages on its rank, so that unequal
    shares give the mean of the concatenated batch (EKFAC's Kronecker factors and scalings).
    """
    like = means[0]
    weights = torch.tensor(counts, dtype=like.dtype, device=like.device)  # (k,)
    *sums, totals = _all_reduce([*(m * c for m, c in zip(means, counts)), weights], group)
    return [total / count for total, count in zip(sums, totals)]
