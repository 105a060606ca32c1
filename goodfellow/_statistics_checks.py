"""The refusals of :mod:`goodfellow.statistics`: an empty batch, non-finite per-example norms."""

from __future__ import annotations

import torch
from torch import Tensor


def refuse_empty(total: int) -> None:
    """Refuse an average over no example (the global count, with a process group)."""
    if total == 0:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")


def check_finite_norms(norms: Tensor) -> None:
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
