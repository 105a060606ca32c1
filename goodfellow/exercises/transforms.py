"""Checks of tutorial 7 (``07_expected_transforms``): E[T(g)].

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import goodfellow
from goodfellow.exercises._common import (
    _answered,
    _as_tensor,
    _call,
    _compare,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 7 ----------------------------------------------------------------------------------


def check_linear_transform(mean_of_linear: Callable) -> bool:
    """Check exercise 7.1.

    ``mean_of_linear(grads, M)`` returns E_i[M g_i] as one vector (P,), for
    per-example gradients ``grads`` (a list of ``(n, ...)`` tensors) and a ``(P, P)`` matrix M.
    """

    def run() -> str:
        grads = [_randn(6, 2, 3, seed=80), _randn(6, 2, seed=81)]
        M = _randn(8, 8, seed=82)
        got = _call(mean_of_linear, grads, M)
        got = (
            torch.cat([_as_tensor(t, "E[Mg]").flatten() for t in got])
            if isinstance(got, (list, tuple))
            else got
        )
        mean = torch.cat([g.mean(0).flatten() for g in grads])
        _compare(got, M @ mean, "your E[M g]")
        return "It equals M E[g]: for a linear T the order does not matter."

    return _verdict("7.1", run)


def check_cabs_first_batch(without_correction: int, with_correction: int) -> bool:
    """Check exercise 7.2.

    the batch size after the first step, without and with bias correction.
    """

    def run() -> None:
        _answered(without_correction, with_correction)
        p = nn.Parameter(torch.zeros(2))
        cabs = goodfellow.CABS([p], lr=1.0, bounds=(1, 10**6))
        grads = [torch.tensor([[4.0, 0.0], [0.0, 0.0]])]  # tr Σ = 4 with the 1/n estimate
        expected_plain = cabs.step(torch.tensor([2.0, 2.0]), grads)
        xi, loss = 0.05 * 4.0, 0.95 * 1.0 + 0.05 * 2.0  # the running averages after one step
        corrected = math.ceil((xi / 0.05) / ((loss - 0.95) / 0.05))
        if int(without_correction) != expected_plain:
            raise _WrongAnswerError("the batch size without correction is not right")
        if int(with_correction) != corrected:
            raise _WrongAnswerError("the batch size with bias correction is not right")

    return _verdict("7.2", run)


def check_cabs_learning_rate_factor(factor: float) -> bool:
    """Check exercise 7.3.

    by what factor CABS's batch size grows when the learning rate doubles.
    """

    def run() -> None:
        _answered(factor)
        sizes = []
        for lr in (0.5, 1.0):
            p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
            cabs = goodfellow.CABS([p], lr=lr, bounds=(1, 10**9), rounding="round")
            grads = [1e4 * _randn(8, 3, seed=83)]
            sizes.append(cabs.step(torch.full((8,), 2.0), grads))
        if not math.isclose(float(factor), sizes[1] / sizes[0], rel_tol=0.01):
            raise _WrongAnswerError("that is not how the rule scales with the learning rate")

    return _verdict("7.3", run)


def check_second_moment(second_moment: Callable) -> bool:
    """Check exercise 7.4.

    ``second_moment(A, G)`` returns the entrywise second moment
    ``(d_out, d_in)`` of the per-example weight gradients for inputs ``(n, T, d_in)``.
    """

    def run() -> None:
        A, G = _randn(5, 3, 4, seed=84), _randn(5, 3, 2, seed=85)
        got = _call(second_moment, A, G)
        layer = goodfellow.linear_factors(A, G, bias=False)
        _compare(got, goodfellow.gradient_second_moment(layer)[0], "your second moment")

    return _verdict("7.4", run)
