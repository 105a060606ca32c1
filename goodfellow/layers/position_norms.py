r"""Per-example norms of a layer applied at several positions: the Gram form or the formed gradient.

A linear layer applied to example :math:`i` at positions :math:`t` (the tokens of a sequence,
the output pixels of a convolution) has the weight gradient :math:`g_i = \sum_t G_t A_t^\top`,
whose squared norm has two exact forms:

.. math::

    \Big\|\sum_t G_t A_t^\top\Big\|_F^2 = \sum_{t,s} (G_t \cdot G_s)(A_t \cdot A_s),

the right-hand side from the two Gram matrices over positions (:math:`T^2 (d_{in} + d_{out})`
multiply-adds per example for the full products, about 5/8 of that for the blocks on and above
the diagonal that :func:`gram_sq_norms` forms; no :math:`(d_{out}, d_{in})` tensor), the
left-hand side by forming :math:`g_i` and squaring it (:math:`T d_{in} d_{out}`). Where one
count is under a quarter of the other that form is taken; in between, where the speed of many
small batched products decides more than their count, both are timed once per shape
(:func:`goodfellow.layers.routes.choice`; ``benchmarks/README.md``, "Gram or materialize",
has the measured crossover). The linear rule (:mod:`goodfellow.layers.linear`) asks this file
for its norms, the shared-input grouping (:mod:`goodfellow.layers.shared_inputs`) for its Gram
form, the clipped sum (:mod:`goodfellow.layers.formed_clipping`) whether a layer is formed.

Index letters: ``n`` example, ``t`` and ``s`` position, ``o`` output and ``i`` input feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from goodfellow.layers.routes import choice

__all__ = [
    "band_height",
    "bias_sq_norms",
    "formed_sq_norms",
    "forms_its_norms",
    "gram_count",
    "gram_sq_norms",
    "positions_sq_norms",
    "sum_of_squares",
]

_CHUNK_BYTES = 8 * 2**20
"""Materialized norms form the per-example gradients of this many bytes of examples at a
time: a buffer's worth, not ``n`` times the layer."""
_SQUARES_CHUNK_BYTES = 4 * 2**20
""":func:`sum_of_squares` squares and sums this many bytes of examples at a time."""


def positions_sq_norms(A: Tensor, G: Tensor, has_bias: bool) -> Tensor:
    r"""Squared norms :math:`\|g_i\|^2` of a layer at ``T > 1`` positions, ``(n,)``.

    Args:
        A: The inputs, ``(n, T, d_in)``.
        G: The output gradients, ``(n, T, d_out)``.
        has_bias: Add the bias gradient's :math:`\|\sum_t G_t\|^2`.
    """
    route = _route_by_count(A, G) or choice(_norms_key(A, G), _routes(A, G), A.device)
    if route == "gram":
        return gram_sq_norms(A, G, bias=has_bias)  # the bias from the Gram already formed
    weight = formed_sq_norms(A, G)
    return weight + bias_sq_norms(G) if has_bias else weight


def _routes(A: Tensor, G: Tensor) -> dict:
    return {"gram": lambda: gram_sq_norms(A, G), "materialized": lambda: formed_sq_norms(A, G)}


def _route_by_count(A: Tensor, G: Tensor) -> str | None:
    """``"gram"`` or ``"materialized"`` where one count is under a quarter of the other."""
    positions, d_in, d_out = A.shape[1], A.shape[2], G.shape[2]
    gram, materialized = gram_count(positions, d_in, d_out), positions * d_in * d_out
    if 4 * gram <= materialized:
        return "gram"
    if 4 * materialized <= gram:
        return "materialized"
    return None


def _norms_key(A: Tensor, G: Tensor) -> tuple:
    return ("linear sq norms", tuple(A.shape), tuple(G.shape), A.dtype, A.device)


def forms_its_norms(A: Tensor, G: Tensor) -> bool:
    """Whether :func:`positions_sq_norms` forms the per-example gradients for these shapes.

    Where the counts leave it to timing and this shape was not timed yet, it is timed now.
    """
    by_count = _route_by_count(A, G)
    if by_count:
        return by_count == "materialized"
    return choice(_norms_key(A, G), _routes(A, G), A.device) == "materialized"


def bias_sq_norms(G: Tensor) -> Tensor:
    r""":math:`\|\sum_t G_t\|^2` per example, ``(n,)``: the bias gradient's squared norm."""
    return G.sum(dim=1).square().sum(dim=1)


def gram_sq_norms(A: Tensor, G: Tensor | Sequence[Tensor], bias: bool = False) -> Tensor:
    r"""``einsum("nts,nts->n", G G^T, A A^T)``: the Gram route, ``(n,)``.

    Several output gradients :math:`G_l` of layers that read the same input :math:`A` (q, k, v:
    :mod:`goodfellow.layers.shared_inputs`) add their Grams before the one dot, since
    :math:`\sum_l \langle G_l G_l^\top, A A^\top\rangle = \langle \sum_l G_l G_l^\top,
    A A^\top\rangle`.

    With ``bias``, every layer's bias gradient :math:`\sum_t G_t` is included: a bias is a
    weight on a constant input 1, so appending 1 to every :math:`A_t` adds 1 to every
    :math:`A_t \cdot A_s`, and :math:`\sum_{t,s} G_t \cdot G_s = \|\sum_t G_t\|^2`. The
    Gram of :math:`G` is formed anyway, so the bias costs ``(n, T, T)`` additions instead of
    another pass over :math:`G` (``(n, T, d_out)``).

    Both Gram matrices are symmetric, so only their blocks on and above the diagonal are
    formed. Write :math:`S(X) = \sum_{(t,s) \in X} (G_t \cdot G_s)(A_t \cdot A_s)` for a set
    :math:`X` of position pairs. With the positions cut into bands :math:`B_1, \dots, B_b`
    (:func:`band_height`), band :math:`k` is multiplied with itself and every later band only,
    :math:`R_k = \{(t, s) : t \in B_k,\ s \ge \min B_k\}`, which holds its diagonal block
    :math:`B_k^2 = B_k \times B_k`; each off-diagonal block, seen once, counts twice:

    .. math::

        S(\text{all}) = \sum_k 2\, S(R_k) - \sum_k S(B_k^2),

    :math:`(b + 1) / 2b` of the multiply-adds of the full products (5/8 for four bands).
    Measured (float32, 2 cores, ``n = 8, T = 256``, a layer from 128 to 512 features): on the
    AMD VM of the eleventh session four bands of 64 rows took 2.7 ms instead of 4.1; on the
    Intel Xeon of the thirteenth, the two bands of 128 rows that :func:`band_height` now gives
    take 2.3 ms against 2.6 for one.
    """
    Gs = [G] if isinstance(G, Tensor) else list(G)
    n, positions = A.shape[:2]
    height = band_height(positions)
    parts = []
    for start in range(0, positions, height):
        rows = slice(start, start + height)
        gram_G = torch.bmm(Gs[0][:, rows], Gs[0][:, start:].transpose(1, 2))  # (n, h, T - start)
        for G_l in Gs[1:]:
            gram_G.baddbmm_(G_l[:, rows], G_l[:, start:].transpose(1, 2))  # summed over layers
        gram_A = torch.bmm(A[:, rows], A[:, start:].transpose(1, 2))  # (n, h, T - start)
        if bias:
            gram_A.add_(1)  # (A_t, 1) . (A_s, 1)
        h = gram_A.shape[1]
        # batched dots, no (n, h, T) product formed; vecdot, not a bmm of (1, ts) by (ts, 1)
        # blocks, which was 20x slower (0.66 vs 0.03 ms at n = 32, T = 64)
        band = torch.linalg.vecdot(_flat(gram_G), _flat(gram_A))  # (n,)
        if gram_A.shape[2] == h:  # the last band is its diagonal block (one band: all of T)
            parts.append(band)
            continue
        diagonal = torch.linalg.vecdot(_flat(gram_G[..., :h]), _flat(gram_A[..., :h]))  # (n,)
        parts.append(2 * band - diagonal)
    if len(parts) <= 1:
        return parts[0] if parts else A.new_zeros(n)
    return torch.stack(parts).sum(dim=0)


def _flat(gram: Tensor) -> Tensor:
    """``(n, h, s) -> (n, h s)``, sizes explicit (``-1`` is ambiguous for ``n = 0``)."""
    return gram.reshape(gram.shape[0], gram.shape[1] * gram.shape[2])


def band_height(positions: int) -> int:
    """Rows per band of :func:`gram_sq_norms`: four bands, none under 128 rows.

    Measured (float32, 2 cores, ``n T`` 2048-3136, widths 128 to 512 and 400 -> 32): on an
    Intel Xeon, one band is fastest up to ``T = 128`` (``T = 64``, 128 -> 512: 0.84 ms against
    1.01 for two bands of 32 rows), two or three bands win by 2-9% at ``T = 196, 256``, four
    from ``T = 512`` on (784 positions: 8.3 against 11.0 ms for one band); smaller bands make
    the batched products slower than the multiply-adds they save. On an earlier AMD VM bands
    of 32 rows still paid. Beyond four bands the saving grows little ((b + 1) / 2b tends to
    1/2) while the products get smaller.
    """
    return max(128, -(-positions // 4))


def gram_count(positions: int, *widths: int) -> float:
    r"""Multiply-adds per example of :func:`gram_sq_norms` for Grams of these widths.

    :math:`T^2 \sum_l d_l` for the full products, times the share the bands keep,
    :math:`(b + 1) / 2b`.
    """
    bands = -(-positions // band_height(positions))
    return positions * positions * sum(widths) * (bands + 1) / (2 * bands)


def formed_sq_norms(A: Tensor, G: Tensor) -> Tensor:
    r"""The squared entries of :math:`\sum_t G_t A_t^\top`, a chunk of examples at a time.

    ``A`` is ``(n, T, d_in)`` and ``G`` is ``(n, T, d_out)``; each chunk's per-example gradients
    are one batched product over the positions, ``"nto,nti->noi"``, as in the linear rule.
    """
    n, d_in, d_out = A.shape[0], A.shape[2], G.shape[2]
    step = max(1, _CHUNK_BYTES // max(1, d_in * d_out * A.element_size()))
    chunks = [
        sum_of_squares(torch.bmm(G[s : s + step].transpose(1, 2), A[s : s + step]))  # (c, o, i)
        for s in range(0, n, step)
    ]  # (chunk,) each; a cat of a single chunk would only copy it
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks) if chunks else A.new_zeros(0)


def sum_of_squares(per_example: Tensor) -> Tensor:
    """Each example's sum of squared entries, ``(n,)``: vecdots, no square root taken.

    ``vecdot`` squares into a temporary before it sums, so the examples go a few MiB at a
    time (``_SQUARES_CHUNK_BYTES``): a temporary of the whole batch is fresh memory at every
    step (3c3d's second convolution, ``(64, 55296)``: 4.1 ms of a ``norms_only`` step in
    the profile, and the step 5% faster in pieces, measured interleaved in one process).
    ``vector_norm`` needs no temporary but sums less accurately (1e-6 relative against 1e-7
    for the squares of 55,296 float32 entries).
    """
    n = per_example.shape[0]
    flat = per_example.reshape(n, math.prod(per_example.shape[1:]))  # (n, P), also for P = 1
    step = max(1, _SQUARES_CHUNK_BYTES // max(1, flat.shape[1] * flat.element_size()))
    if step >= n:
        return torch.linalg.vecdot(flat, flat)
    pieces = [torch.linalg.vecdot(rows, rows) for rows in flat.split(step)]  # (step,) each
    return torch.cat(pieces)
