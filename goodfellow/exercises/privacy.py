"""Checks of tutorial 11 (``11_private_training``): DP-SGD and its accountant.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from goodfellow.exercises._common import (
    _call,
    _compare,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 11 ---------------------------------------------------------------------------------


def check_removal_shifts(removal_shifts: Callable) -> bool:
    """Check exercise 11.1.

    ``removal_shifts(grads, max_norm)`` returns, for per-example gradients ``grads`` (a dict of
    ``(n, *shape)`` tensors), the norms ``(n,)`` of the change of the clipped sum when each
    example in turn is removed.
    """

    def run() -> str:
        grads = {"weight": _randn(6, 3, 4, seed=106), "bias": _randn(6, 3, seed=107)}
        norms = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
        max_norm = norms.median().item()
        got = _call(removal_shifts, grads, max_norm)
        _compare(got, norms.clamp(max=max_norm), "your shifts", rtol=1e-6)
        return "Removing one example moves the clipped sum by at most C."

    return _verdict("11.1", run)


def _opacus_accountants() -> Any:
    try:
        from opacus import accountants
    except ImportError as error:  # pragma: no cover - the tutorial needs Opacus anyway
        raise _WrongAnswerError("this check needs Opacus (pip install opacus)") from error
    return accountants


def check_update_noise(update_noise: Callable) -> bool:
    """Check exercise 11.2.

    ``update_noise(sample_rate)`` is the noise per entry of the update, ``σ C / (q N)``, with σ
    chosen by Opacus' RDP accountant for ε = 2 at δ = 1e-5 over 15 epochs, N = 1440, C = 1.
    """

    def run() -> str:
        accountants = _opacus_accountants()
        noises = {}
        for rate in (1 / 24, 1 / 6):
            got = float(_call(update_noise, rate))
            sigma = accountants.utils.get_noise_multiplier(
                target_epsilon=2.0,
                target_delta=1e-5,
                sample_rate=rate,
                steps=round(15 / rate),
                accountant="rdp",
            )
            expected = sigma * 1.0 / (rate * 1440)
            if not math.isclose(got, expected, rel_tol=1e-6):
                raise _WrongAnswerError(f"for q = 1/{round(1 / rate)} the noise is off")
            noises[rate] = expected
        better = "1/6" if noises[1 / 6] < noises[1 / 24] else "1/24"
        return f"The less noisy update comes with q = {better}."

    return _verdict("11.2", run)


def check_two_epsilons(two_epsilons: Callable) -> bool:
    """Check exercise 11.3.

    ``two_epsilons(sigma, sample_rate, steps)`` returns ``(ε of the RDP accountant, ε of the PRV
    accountant)`` at δ = 1e-5 for the same history.
    """

    def run() -> None:
        accountants = _opacus_accountants()
        for sigma, rate, steps in ((1.0, 1 / 24, 360), (2.0, 1 / 6, 90)):
            got = _call(two_epsilons, sigma, rate, steps)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise _WrongAnswerError("return two numbers: (RDP epsilon, PRV epsilon)")
            for name, kind, value in (
                ("RDP", accountants.RDPAccountant, got[0]),
                ("PRV", accountants.PRVAccountant, got[1]),
            ):
                accountant = kind()
                accountant.history = [(sigma, rate, steps)]
                expected = accountant.get_epsilon(1e-5)
                if not math.isclose(float(value), expected, rel_tol=1e-3):
                    raise _WrongAnswerError(f"the {name} epsilon for sigma = {sigma} is off")

    return _verdict("11.3", run)
