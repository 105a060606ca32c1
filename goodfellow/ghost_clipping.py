r"""The clipped mean in two backwards: no layer's records held, for about one more backward.

:func:`goodfellow.clipped_mean` reweights each layer's recorded output gradients,
:math:`\sum_i w_i g_i = (wG)^\top A`, once every example's norm is known, so the recorder holds
every layer's inputs and output gradients until the last layer's norm is in:
:math:`nT\sum_l (d_{in,l} + d_{out,l})` numbers, growing with the depth, and more than the
:math:`nP` of the per-example gradients themselves once a sequence is longer than the model is
wide (Bu et al. 2023, arXiv:2210.00038, call this one-backward route "book-keeping").

The weights :math:`w_i = \min(1, C/\|g_i\|)/n` are numbers, so

.. math::

    \sum_i w_i g_i = \sum_i w_i \nabla_\theta L_i = \nabla_\theta \Big(\sum_i w_i L_i\Big)
    \quad\text{with the } w_i \text{ held constant}:

the clipped sum is the ordinary batch gradient of the reweighted loss. Hence two backwards
through one forward: the first takes the norms layer by layer and drops each layer's records
as it goes (:meth:`goodfellow.PerExampleGradients.backward_with_norms`), keeping the graph;
the second differentiates :math:`\sum_i w_i L_i` with the recorder's hooks silent, and
autograd forms the clipped sum in its usual weight-gradient kernels. This is the "ghost
clipping" of Li et al. 2022 (arXiv:2110.05679) and Opacus, with the norms of every layer rule
of :mod:`goodfellow.layers`.

What it costs: the second backward, about one plain step more (the first stops at the layers'
outputs, so it skips the weight gradients); and, since the first backward keeps the graph for
the second, one layer's backward work on top of all the saved activations, where a plain
backward has freed the layers above it by then (for attention, the gradient of its
``(n, h, T, T)`` scores). That does not grow with the depth: on the benchmark's language model
at ``T = 64`` it is 6.5 MiB above a plain step with 2 blocks and with 6, where the
one-backward clipped mean holds 9.4 and 21.0 MiB. A convolution is the exception: its norms
form its per-example gradients (as :meth:`~goodfellow.PerExampleGradients.backward_with_norms`
says), which then sit on top of every activation the graph keeps, so on a CNN the one-backward
clipped mean peaks lower (the benchmark's ``cnn-mnist``: 129% of ``n * P`` above a plain step
against 48%).

It needs each example's loss :math:`L_i`, not only their sum: the second backward weights
them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from goodfellow._autocast import without_autocast
from goodfellow._norm_stream import backward_with_norms
from goodfellow._statistics_checks import check_finite_norms
from goodfellow.hooks import PerExampleGradients
from goodfellow.transforms import _check_max_norm, _clip_factors

__all__ = ["ghost_clipped_mean"]


@without_autocast
def ghost_clipped_mean(
    pe: PerExampleGradients, losses: Tensor, max_norm: float
) -> dict[str, Tensor]:
    r"""The DP-SGD clipped mean :math:`\frac1n\sum_i g_i\min(1, C/\|g_i\|)` in two backwards.

    The numbers of ``clipped_mean(recorded_factors(pe), max_norm)`` after ``pe.backward``,
    without holding the layers' records: the norms are taken during a first backward that
    drops each layer's records (:meth:`~goodfellow.PerExampleGradients.backward_with_norms`),
    and the weighted sum is the gradient of :math:`\sum_i w_i L_i` from a second one (the
    derivation, and what it costs, are in this module's text). No parameter's ``.grad`` is
    written; put the result there with :func:`goodfellow.assign_grads`. Afterwards the batch
    is gone, as after ``backward_with_norms``.

    Args:
        pe: An attached recorder that has recorded the forward of this batch (and no backward
            of it yet).
        losses: Each example's own loss :math:`L_i`, shape ``(n,)``, from that forward: for a
            language model the loss of its tokens summed (or averaged) over the example.
            Whatever ``pe.loss_reduction`` says, the per-example gradients are
            :math:`\nabla L_i` of these losses.
        max_norm: The clipping norm :math:`C > 0`.

    Returns:
        Dict from parameter name to a tensor of the parameter's shape, for every trainable
        parameter the recorder claims, in ``model.named_parameters()`` order (the keys of
        :attr:`~goodfellow.PerExampleGradients.grads`).

    Raises:
        TypeError: If ``pe`` is not a :class:`~goodfellow.PerExampleGradients` or ``losses``
            is not a tensor.
        ValueError: If ``losses`` is not of shape ``(n,)`` for the recorded batch of ``n``
            examples or does not require grad, if ``max_norm`` is not a positive finite
            number, or if an example's gradient holds NaN or inf; the refusals of
            ``backward_with_norms`` (a weight shared by several modules, a frozen weight
            with a trained bias).
        RuntimeError: If the recorder is detached, or no forward of this batch was recorded.
    """
    max_norm = _check_max_norm(max_norm)
    _check_recorder(pe)
    _check_losses(losses, pe.batch_size)
    n = losses.shape[0]
    # the recorder undoes a mean's 1/n itself: either way its norms are those of grad L_i
    total = losses.sum() if pe.loss_reduction == "sum" else losses.mean()
    norms = backward_with_norms(pe, total, retain_graph=True)  # (n,)
    check_finite_norms(norms)
    weights = (_clip_factors(norms, max_norm) / n).to(losses.dtype)  # (n,): min(1, C/|g_i|)/n
    names = list(pe._owners)
    params = [pe._params[name] for name in names]
    with _unrecorded(pe):
        sums = torch.autograd.grad(losses @ weights, params, allow_unused=True)
    return {
        name: torch.zeros_like(param) if clipped is None else clipped
        for name, param, clipped in zip(names, params, sums)
    }


def _check_recorder(pe: object) -> None:
    """Refuse anything but an attached recorder: a detached one has no hooks for the norms."""
    if not isinstance(pe, PerExampleGradients):
        raise TypeError(
            f"pe must be a goodfellow.PerExampleGradients, got {type(pe).__name__}."
        )
    if not pe.attached:
        raise RuntimeError(
            "the recorder is detached: its hooks take the norms during the first backward. "
            "Call ghost_clipped_mean inside its `with` block (or before detach())."
        )


def _check_losses(losses: object, n: int | None) -> None:
    """Refuse per-example losses that are not one number per recorded example."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"losses must be a tensor of each example's loss, got {type(losses).__name__}."
        )
    if n is None:
        raise RuntimeError(
            "no forward of this batch was recorded: run the model while the recorder is "
            "attached, then pass the losses of that forward."
        )
    if losses.shape != (n,) or not losses.requires_grad:
        raise ValueError(
            f"losses must be the {n} recorded examples' own losses, shape ({n},), that "
            f"require grad; got {tuple(losses.shape)} with requires_grad="
            f"{losses.requires_grad}. Compute the loss with reduction='none' and sum (or "
            "average) it over every dimension but the batch's."
        )


@contextmanager
def _unrecorded(pe: PerExampleGradients) -> Iterator[None]:
    """Let one backward pass through the recorded forward without the hooks taking it.

    Every hook of the recorder does nothing while it is not attached; the hooks stay on the
    model, so the next forward is recorded as usual.
    """
    attached, pe._attached = pe._attached, False
    try:
        yield
    finally:
        pe._attached = attached
