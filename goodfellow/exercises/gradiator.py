"""Checks of tutorial 8 (``08_gradiator``): a learned backward.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

import goodfellow
from goodfellow.exercises._common import (
    _as_tensor,
    _call,
    _compare,
    _generator,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 8 ----------------------------------------------------------------------------------


def check_best_step(best_step: Callable) -> bool:
    """Check exercise 8.1.

    ``best_step(c, u, f_norm, q)`` returns the ε that minimizes the error model
    ``c ε^q + u f_norm / ε``.
    """

    def run() -> None:
        for c, u, f_norm, q in ((1.0, 1.1e-16, 1.0, 1), (0.3, 6e-8, 2.0, 2), (5.0, 1e-16, 0.5, 2)):
            got = float(_call(best_step, c, u, f_norm, q))
            grid = torch.logspace(-12, 0, 200_001, dtype=torch.float64)
            error = c * grid**q + u * f_norm / grid
            expected = grid[error.argmin()].item()
            if not math.isclose(got, expected, rel_tol=1e-3):
                raise _WrongAnswerError(f"for q = {q} the step does not minimize the error model")

    return _verdict("8.1", run)


def check_broyden_update(broyden_update: Callable) -> bool:
    """Check exercise 8.2.

    ``broyden_update(J, dx, df)`` returns the corrected Jacobian estimate.
    """

    def run() -> str:
        J, dx, df = _randn(4, 6, seed=86), _randn(6, seed=87), _randn(4, seed=88)
        got = _call(broyden_update, J.clone(), dx, df)
        _compare(got, J + torch.outer(df - J @ dx, dx) / dx.dot(dx), "your update")
        if not torch.allclose(_as_tensor(got, "J") @ dx, df):
            raise _WrongAnswerError("the result does not satisfy the secant condition J dx = df")
        return "It satisfies the new secant condition and changes J as little as possible."

    return _verdict("8.2", run)


def check_noise_prediction(predicted_error: Callable) -> bool:
    """Check exercise 8.3.

    ``predicted_error(m, p, sigma, eps, k)`` is the expected squared error of
    ``estimate_jacobian`` with central differences on a noisy linear map.
    """

    def run() -> str:
        m, p, sigma, eps, k, draws = 4, 3, 1e-6, 1e-3, 4, 300
        got = float(_call(predicted_error, m, p, sigma, eps, k))
        A = _randn(p, m, seed=89)
        x = _randn(m, seed=90)
        noise = _generator(91)

        def noisy(v: Tensor) -> Tensor:
            xi = torch.randn(*v.shape[:-1], p, dtype=torch.float64, generator=noise)
            return v @ A.T + sigma * xi

        errors = [
            (goodfellow.estimate_jacobian(noisy, x, k, eps, generator=_generator(seed)) - A)
            .square()
            .sum()
            .item()
            for seed in range(draws)
        ]
        measured = sum(errors) / draws
        if not math.isclose(got, measured, rel_tol=0.25):
            raise _WrongAnswerError(
                f"your prediction is {got / measured:.2f} times the measured mean"
            )
        return f"Measured over {draws} draws: {measured:.3g}."

    return _verdict("8.3", run)
