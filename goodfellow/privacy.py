r"""Differentially private gradients: the DP-SGD update from the clipped sum, plus noise.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) releases, at every step, a noisy average of clipped
per-example gradients,

.. math::

    \tilde g = \frac1B\Big(\sum_{i \in \mathcal{B}} \operatorname{clip}_C(g_i)
    + \mathcal{N}(0, \sigma^2 C^2 I)\Big), \qquad
    \operatorname{clip}_C(g) = g \min\big(1, C / \|g\|_2\big).

Why this is private. Two data sets are *neighbours* if one has an example the other lacks. Every
clipped gradient has norm at most :math:`C`, so adding or removing one example moves the clipped
sum by at most :math:`C` in L2 norm: its *sensitivity* is :math:`C`. Gaussian noise of standard
deviation :math:`\sigma C` per coordinate then makes the sum a Gaussian mechanism with noise
multiplier :math:`\sigma`. When the batch is drawn by *Poisson sampling* (every example joins
independently with probability :math:`q`) the step is the *sampled* Gaussian mechanism, whose
privacy loss is much smaller than that of the full-data step, and a privacy accountant (Opacus'
``RDPAccountant`` or ``PRVAccountant``) composes it over the steps into an
:math:`(\varepsilon, \delta)` guarantee. This module computes the update; accounting is left to
those maintained accountants, fed with :math:`(\sigma, q)` once per step.

Why divide by :math:`B = qN`, not by the realized batch size :math:`n`. :math:`qN` is the
expected batch size, a constant that does not depend on which examples were drawn, so dividing by
it is post-processing and costs no privacy. The realized :math:`n` changes by one with the
presence of an example: dividing by it is not covered by the sampled Gaussian mechanism's analysis.
Opacus divides by the expected batch size for the same reason. ``expected_batch_size=None``
(divide by :math:`n`) is for batches whose size is fixed and public.

Empty batches. Poisson sampling draws them (with probability :math:`(1-q)^N`); the clipped sum
is then zero and the update is the noise alone, which is what the analysis assumes: the step is
still released.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from goodfellow._autocast import without_autocast
from goodfellow.layers.linear import LinearFactors
from goodfellow.statistics import _clipped_sum_and_count
from goodfellow.transforms import PerExampleGrads, _check_max_norm

__all__ = ["private_mean"]

Source = PerExampleGrads | LinearFactors | Sequence[LinearFactors] | Mapping[str, LinearFactors]


def _check_noise_multiplier(noise_multiplier: float) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise TypeError(
            "noise_multiplier must be a number sigma >= 0 (the noise's standard deviation in "
            f"units of max_norm), got {type(noise_multiplier).__name__}."
        )
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(
            "noise_multiplier must be a finite number sigma >= 0 (0 adds no noise), got "
            f"{noise_multiplier}."
        )
    return float(noise_multiplier)


def _check_expected_batch_size(expected_batch_size: float | None) -> float | None:
    if expected_batch_size is None:
        return None
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, (int, float)):
        raise TypeError(
            "expected_batch_size must be a positive number (q * N for Poisson sampling with "
            f"rate q from N examples) or None, got {type(expected_batch_size).__name__}."
        )
    if not math.isfinite(expected_batch_size) or expected_batch_size <= 0:
        raise ValueError(
            "expected_batch_size must be a positive finite number (q * N for Poisson sampling "
            f"with rate q from N examples), got {expected_batch_size}."
        )
    return float(expected_batch_size)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "create one with torch.Generator().manual_seed(seed)."
        )


def _check_group(group: object) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "group must be a torch.distributed process group (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(group).__name__}."
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group first (or pass group=None)."
        )


@without_autocast
def private_mean(
    source: Source,
    max_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    generator: torch.Generator | None = None,
    group: object = None,
) -> PerExampleGrads:
    r"""The DP-SGD update: clipped per-example gradients summed, Gaussian noise added, divided.

    .. math::

        \tilde g = \frac1B\Big(\sum_i g_i \min\big(1, C / \|g_i\|\big)
        + \mathcal{N}(0, \sigma^2 C^2 I)\Big),

    per parameter, with :math:`C` = ``max_norm``, :math:`\sigma` = ``noise_multiplier`` and
    :math:`B` = ``expected_batch_size``. The clipped sum has sensitivity :math:`C` (one example
    more or less moves it by at most :math:`C`), so the noise makes each step a Gaussian
    mechanism with noise multiplier :math:`\sigma`; see :mod:`goodfellow.privacy` for why
    :math:`B` should be the expected batch size :math:`qN` under Poisson sampling, and feed
    :math:`(\sigma, q)` to a privacy accountant (e.g. Opacus' ``RDPAccountant``) once per step.
    A factored source is clipped by reweighting, as in :func:`goodfellow.clipped_mean`: no
    ``n * P`` tensor of per-example gradients is formed (a layer whose norms are cheaper from
    its formed per-example gradients, a convolution or a Linear at many positions, forms its
    own, ``n`` times that layer's parameters, as that function says). The noise is drawn with
    ``torch.randn``, one tensor per result in the result's order; it is not hardened against
    floating-point attacks on the Gaussian sampler (Mironov 2012): for a deployment, use a
    cryptographically secure generator as Opacus' ``secure_mode`` does.

    Args:
        source: The batch's per-example gradients, as for :func:`goodfellow.clipped_mean`: a
            list, tuple or dict of ``(n, *param.shape)`` tensors, a
            :class:`goodfellow.LinearFactors`, or a list or dict of them (e.g.
            ``recorded_factors(pe)``). An empty batch (``n = 0``) is allowed.
        max_norm: The clipping norm :math:`C > 0`.
        noise_multiplier: :math:`\sigma \ge 0`, the noise's standard deviation in units of
            :math:`C`; ``0`` gives the clipped sum divided by :math:`B` (no privacy).
        expected_batch_size: :math:`B > 0`, the divisor; ``q * N`` for Poisson sampling with
            rate ``q`` from ``N`` examples (it need not be an integer). ``None`` divides by the
            realized batch size (summed over the ranks with ``group``), for public batch sizes.
        generator: Draws the noise, which is then reproducible; ``None`` uses torch's global
            generator. It must live on the gradients' device. With ``group`` only the group's
            rank 0 draws noise (the others' generators are not advanced).
        group: A ``torch.distributed`` process group. Each rank passes the per-example gradients
            of its own examples and the same ``max_norm``, ``noise_multiplier`` and
            ``expected_batch_size`` (the global one); the clipped sums are all-reduced, the noise
            is added once in total (by the group's rank 0, before the all-reduce) and every rank
            returns the same update: that of one process on the union of the ranks' examples.
            All ranks must call together; a rank that raises before the all-reduce leaves the
            others waiting until the group's timeout.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as
        :func:`goodfellow.clipped_mean` lays it out (the source's container for per-example
        gradients; ``[W, b, ...]`` for a list of factors; ``{"name.weight", "name.bias"}`` for a
        dict of factors), ready for :func:`goodfellow.assign_grads`.

    Raises:
        TypeError: If ``noise_multiplier``, ``max_norm`` or ``expected_batch_size`` is not a
            number, ``generator`` is not a ``torch.Generator``, ``group`` is not a process group,
            or the source is malformed (see :func:`goodfellow.clipped_mean`).
        ValueError: If ``noise_multiplier < 0``, ``max_norm <= 0``, ``expected_batch_size <= 0``
            (or non-finite), the generator lives on another device than the gradients, the batch
            is empty (on all ranks) while ``expected_batch_size`` is ``None``, or the source is
            malformed or holds NaN or inf.
        RuntimeError: If ``group`` is given but ``torch.distributed`` is not initialized.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> with goodfellow.PerExampleGradients(model) as pe:
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> update = private_mean(
        ...     goodfellow.recorded_factors(pe), max_norm=1.0, noise_multiplier=1.1,
        ...     expected_batch_size=4.0, generator=torch.Generator().manual_seed(0),
        ... )
        >>> sorted(update)
        ['bias', 'weight']
    """
    max_norm = _check_max_norm(max_norm)
    sigma = _check_noise_multiplier(noise_multiplier)
    divisor = _check_expected_batch_size(expected_batch_size)
    _check_generator(generator)
    _check_group(group)

    # This rank's clipped sum; the all-reduce comes below, after rank 0 has added the noise.
    summed, n = _clipped_sum_and_count(source, max_norm)  # n: this rank's examples
    keys = list(summed.keys()) if isinstance(summed, Mapping) else None
    sums = list(summed.values()) if isinstance(summed, Mapping) else list(summed)  # param.shape
    like = sums[0]
    if generator is not None and sigma > 0 and generator.device.type != like.device.type:
        raise ValueError(
            f"generator lives on {generator.device} but the gradients on {like.device}; create "
            f"it there: torch.Generator(device={str(like.device)!r})."
        )

    adds_noise = sigma > 0
    if group is not None:
        import torch.distributed as dist

        adds_noise = adds_noise and dist.get_rank(group) == 0
    if adds_noise:
        std = sigma * max_norm
        # add(s, z, alpha=std) scales and adds in one pass: no std * z tensor of size P
        sums = [
            torch.add(
                s,
                torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device),
                alpha=std,
            )
            for s in sums
        ]  # param.shape each

    if group is not None:
        import torch.distributed as dist

        # One all-reduce of every sum laid end to end: O(P) numbers, the latency paid once.
        flat = torch.cat([s.detach().reshape(-1) for s in sums])  # (P,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        sizes = [s.numel() for s in sums]
        sums = [piece.view_as(s) for piece, s in zip(torch.split(flat, sizes), sums)]
        if divisor is None:
            count = torch.tensor([n], dtype=torch.int64, device=like.device)
            dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
            n = int(count.item())

    if divisor is None:
        if n == 0:
            raise ValueError(
                "the batch is empty (n = 0) and expected_batch_size is None, so there is "
                "nothing to divide by: pass expected_batch_size = q * N (the sampling rate "
                "times the data set size), as Poisson sampling needs anyway."
            )
        divisor = float(n)
    results = [s / divisor for s in sums]
    if keys is not None:
        return dict(zip(keys, results))
    return type(summed)(results)
