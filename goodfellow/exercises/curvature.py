"""Checks of tutorial 6 (``06_kfac_ekfac``): KFAC and EKFAC.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import goodfellow
from goodfellow.exercises._common import (
    _answered,
    _call,
    _compare,
    _generator,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 6 ----------------------------------------------------------------------------------


def check_one_example_fisher(one_example_fisher: Callable) -> bool:
    """Check exercise 6.1.

    ``one_example_fisher(a_bar, delta)`` returns the empirical Fisher
    ``(P, P)`` of one example from its ``ā (1, d_in + 1)`` and ``δ (1, d_out)``, built from the
    per-example gradient ``δ āᵀ``.
    """

    def run() -> str:
        a_bar, delta = _randn(1, 4, seed=50), _randn(1, 3, seed=51)
        got = _call(one_example_fisher, a_bar, delta)
        A, G = goodfellow.kfac_factors(a_bar, delta)
        _compare(got, torch.kron(G, A), "your Fisher")
        return "It equals KFAC's G ⊗ A: for one example the approximation is exact."

    return _verdict("6.1", run)


def check_factored_damping(factored_step: Callable) -> bool:
    """Check exercise 6.2.

    ``factored_step(g_hat, A, G, damping)`` returns
    ``(G + γI)⁻¹ ĝ (A + γI)⁻¹`` with γ = √damping, shape of ``g_hat``.
    """

    def run() -> None:
        a_bar, delta = _randn(20, 4, seed=52), _randn(20, 3, seed=53)
        A, G = goodfellow.kfac_factors(a_bar, delta)
        g_hat, damping = _randn(3, 4, seed=54), 0.1
        got = _call(factored_step, g_hat, A, G, damping)
        gamma = damping**0.5
        kron = torch.kron(
            G + gamma * torch.eye(3, dtype=G.dtype), A + gamma * torch.eye(4, dtype=A.dtype)
        )
        expected = torch.linalg.solve(kron, g_hat.flatten()).reshape(3, 4)
        _compare(got, expected, "your step")

    return _verdict("6.2", run)


def check_best_diagonal(best_diagonal: Callable) -> bool:
    """Check exercise 6.3.

    ``best_diagonal(F, Q)`` returns the vector S (P,) for which
    ``Q diag(S) Qᵀ`` is closest to ``F`` in Frobenius norm.
    """

    def run() -> None:
        g = _randn(30, 6, seed=55)
        F = g.T @ g / 30  # (6, 6), an empirical Fisher
        Q = torch.linalg.qr(_randn(6, 6, seed=56)).Q
        got = _call(best_diagonal, F, Q)
        _compare(got, torch.diagonal(Q.T @ F @ Q), "your diagonal")

    return _verdict("6.3", run)


def check_sum_learning_rate(learning_rate: float, batch_size: int = 64) -> bool:
    """Check exercise 6.4.

    the learning rate that makes EKFAC on a summed loss take the steps of
    η = 0.03 on the mean loss.
    """

    def run() -> None:
        _answered(learning_rate)

        def train(reduction: str, lr: float) -> Tensor:
            torch.manual_seed(4)
            net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
            optimizer = goodfellow.EKFAC(net, lr=lr, damping=1e-3, loss_reduction=reduction)
            for step in range(3):
                x = _randn(batch_size, 5, seed=60 + step)
                y = torch.randint(0, 3, (batch_size,), generator=_generator(70 + step))
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y, reduction=reduction).backward()
                optimizer.step()
            optimizer.remove_hooks()
            return torch.cat([p.detach().flatten() for p in net.parameters()])

        try:
            lr = float(learning_rate)
        except (TypeError, ValueError) as error:
            raise _WrongAnswerError("give the learning rate as a number") from error
        if not torch.allclose(train("sum", lr), train("mean", 0.03), rtol=1e-6, atol=1e-9):
            raise _WrongAnswerError("with that learning rate the trajectories differ")

    return _verdict("6.4", run)
