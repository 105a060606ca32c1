r"""The batch-size factor: from the gradient of the batch loss to each example's own.

Autograd differentiates the batch loss :math:`\mathcal{L}`. With ``reduction="sum"``,
:math:`\mathcal{L} = \sum_i L_i` and :math:`\partial\mathcal{L}/\partial Z_i = \partial L_i /
\partial Z_i`; with ``reduction="mean"``, :math:`\mathcal{L} = \frac1n\sum_i L_i` and the row
is :math:`\frac1n \partial L_i/\partial Z_i`. Every route of the package multiplies by this
factor once, in the same place: where the recorded output gradients become per-example ones.
"""

from __future__ import annotations

__all__ = ["LOSS_REDUCTIONS", "batch_size_factor"]

LOSS_REDUCTIONS = ("sum", "mean")
"""The reductions of a batch loss that per-example gradients can be recovered from."""

def batch_size_factor(loss_reduction: str, batch_size: int) -> int:
    r"""The factor that turns a row of the batch loss's gradient into an example's own gradient.

    Args:
        loss_reduction: ``"sum"`` (batch loss :math:`\sum_i L_i`) or ``"mean"``
            (:math:`\frac1n \sum_i L_i`).
        batch_size: The number of examples ``n`` the batch loss was reduced over.

    Returns:
        ``1`` for ``"sum"``, ``batch_size`` for ``"mean"``.

    Raises:
        ValueError: For any other ``loss_reduction``.
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}: pass "
            "the reduction the batch loss was computed with (torch losses default to 'mean')."
        )
    return batch_size if loss_reduction == "mean" else 1
