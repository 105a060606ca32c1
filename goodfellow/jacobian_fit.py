r"""Fitting a Jacobian by least squares: :math:`\hat J^\top = dX^+ dF`, and finite differences.

:func:`goodfellow.fit_jacobian` fits :math:`J` to pairs of input perturbations and output
changes with the least-norm least-squares solution, from the SVD of :math:`dX`;
:func:`goodfellow.estimate_jacobian` makes the pairs by random finite differences at one point.
:mod:`goodfellow.gradiator` derives the fit and what it recovers, builds
:func:`goodfellow.fitted_gradiator` on it, and re-exports both names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from goodfellow._gradiator_checks import (
    _check_eps,
    _check_finite,
    _check_generator,
    _check_num_samples,
    _check_pairs,
    _check_point,
    _check_precision,
    _checked_output,
)

__all__ = ["estimate_jacobian", "fit_jacobian"]


def fit_jacobian(dx: Tensor, df: Tensor) -> Tensor:
    r"""The least-squares Jacobian of sampled perturbations: :math:`\hat J^\top = dX^+ dF`.

    Solves :math:`\min_J \|dX J^\top - dF\|_F` and, among the minimizers, takes the one of least
    norm (zero on directions no perturbation explored). The pseudo-inverse comes from the SVD of
    ``dx``, with singular values below ``max(k, m)`` times the dtype's epsilon (relative to the
    largest) treated as zero; ``dxᵀ dx`` is never formed, so the accuracy is governed by
    :math:`\kappa(dX)`, not :math:`\kappa(dX)^2`.

    Args:
        dx: Input perturbations, one per row, shape ``(k, m)``, or a stack of such problems
            ``(..., k, m)``.
        df: The matching output changes, shape ``(k, p)`` or ``(..., k, p)``.

    Returns:
        Tensor of shape ``(p, m)`` (or ``(..., p, m)``): :math:`\hat J`, exact when
        ``df = dx @ J.T`` and ``dx`` has rank ``m``.

    Raises:
        TypeError: If ``dx`` or ``df`` is not a float32 or float64 tensor.
        ValueError: If they have fewer than 2 dimensions, different leading shapes or numbers of
            rows, dtypes or devices, or hold non-finite values.
    """
    _check_pairs(dx, df)
    _check_precision(dx, "dx")
    return (torch.linalg.pinv(dx) @ df).mT  # (..., m, k) @ (..., k, p) -> (..., p, m)


def _random_directions(
    count: int, num: int, m: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``count`` sets of ``num`` random unit directions in R^m, orthonormal in blocks of ``m``.

    Each block is the Q factor of a Gaussian matrix, signs fixed so the block is Haar-distributed:
    it spans the same uniformly random subspace as the Gaussian vectors (same error statistics),
    but is perfectly conditioned, which makes the least-squares fit as accurate as it can be and,
    under noise, its variance the smallest.
    """
    device = generator.device if generator is not None else like.device
    blocks = []
    for start in range(0, num, m):
        size = min(m, num - start)
        gaussian = torch.randn(
            count, m, size, generator=generator, dtype=like.dtype, device=device
        )  # (count, m, size)
        q, r = torch.linalg.qr(gaussian)  # (count, m, size), (count, size, size)
        signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)  # (count, size)
        blocks.append((q * signs.unsqueeze(1).to(q.dtype)).mT)  # (count, size, m)
    return torch.cat(blocks, dim=1).to(like.device)  # (count, num, m)


def _finite_difference_jacobians(
    evaluate: Callable[[Tensor], Tensor],
    points: Tensor,
    num_samples: int,
    eps: float,
    central: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Fitted Jacobians at each row of ``points`` (n, m); ``evaluate`` maps (N, m) to (N, p).

    The step actually taken, ``(x + dx) - x`` in floating point, is paired with the output change
    instead of ``dx``, so the rounding of ``x + dx`` does not enter the estimate.
    """
    n, m = points.shape
    directions = _random_directions(n, num_samples, m, points, generator)  # (n, k, m)
    base = points.unsqueeze(1)  # (n, 1, m)
    plus = base + eps * directions  # (n, k, m)
    if central:
        minus = base - eps * directions  # (n, k, m)
        values = evaluate(torch.cat([plus, minus], dim=1).reshape(-1, m))  # (n * 2k, p)
        f_plus, f_minus = values.reshape(n, 2, num_samples, -1).unbind(1)  # 2 x (n, k, p)
        dx, df = (plus - minus) / 2, (f_plus - f_minus) / 2  # (n, k, m), (n, k, p)
    else:
        values = evaluate(torch.cat([plus, base], dim=1).reshape(-1, m))  # (n * (k + 1), p)
        values = values.reshape(n, num_samples + 1, -1)  # (n, k + 1, p)
        dx, df = plus - base, values[:, :-1] - values[:, -1:]  # (n, k, m), (n, k, p)
    return fit_jacobian(dx, df)  # (n, p, m)


def estimate_jacobian(
    fun: Callable[[Tensor], Tensor],
    x: Tensor,
    num_samples: int,
    eps: float = 1e-3,
    central: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate :math:`J_f(x)` from random finite differences and a least-squares fit.

    Draws ``num_samples`` random unit directions :math:`u_j` (orthonormal in blocks of ``m``),
    steps :math:`dx_j = \varepsilon u_j` and records

    * one-sided: :math:`df_j = f(x + dx_j) - f(x)`, error :math:`O(\varepsilon)`,
      ``num_samples + 1`` calls of ``fun``;
    * central: :math:`df_j = \frac12\bigl(f(x + dx_j) - f(x - dx_j)\bigr)`, error
      :math:`O(\varepsilon^2)`, ``2 * num_samples`` calls;

    then returns :func:`fit_jacobian` of the pairs. The step actually taken,
    :math:`(x + dx_j) - x` in floating point, is used rather than :math:`dx_j`, so the rounding
    of :math:`x + dx_j` does not enter the estimate. Exact (to round-off) for linear ``f`` once
    ``num_samples >= m``; for fewer, the estimate is :math:`J P` with :math:`P` the projector onto
    the explored directions.

    Args:
        fun: The black box, called on single points: ``(m,)`` tensor in, ``(p,)`` tensor out
            (see :func:`wrap_numpy` for NumPy code).
        x: The point, shape ``(m,)``, floating point.
        num_samples: The number ``k >= 1`` of random directions.
        eps: The step length :math:`\varepsilon > 0`. Round-off costs about
            :math:`u\|f\|/\varepsilon`: near :math:`\sqrt u` is best one-sided,
            :math:`u^{1/3}` central (:math:`u \approx 10^{-16}` in float64, :math:`6 \cdot
            10^{-8}` in float32).
        central: Central differences (default) or one-sided.
        generator: Optional ``torch.Generator`` for the directions, for reproducibility.

    Returns:
        Tensor of shape ``(p, m)`` in ``x``'s dtype: :math:`\hat J_f(x)`.

    Raises:
        TypeError: If ``x`` is not a float32 or float64 tensor, ``num_samples`` not an integer,
            ``generator`` not a ``torch.Generator``, or ``fun`` does not return a tensor.
        ValueError: If ``x`` is not 1-D, empty or not finite, ``num_samples < 1``, ``eps <= 0``
            or not finite, or ``fun`` returns a tensor that is not 1-D, changes shape between
            calls or holds non-finite values.
    """
    _check_point(x)
    num_samples = _check_num_samples(num_samples)
    eps = _check_eps(eps)
    _check_generator(generator)
    evaluate = _PointEvaluator(fun, x)
    with torch.no_grad():
        points = x.detach().unsqueeze(0)  # (1, m)
        jacobians = _finite_difference_jacobians(
            evaluate, points, num_samples, eps, central, generator
        )  # (1, p, m)
    return jacobians[0]


class _PointEvaluator:
    """Evaluate ``fun`` point by point on an ``(N, m)`` stack, checking every output."""

    def __init__(self, fun: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.fun, self.x, self.shape = fun, x, None

    def __call__(self, points: Tensor) -> Tensor:
        return torch.stack([self._one(point) for point in points])  # (N, p)

    def _one(self, point: Tensor) -> Tensor:
        y = _checked_output(self.fun(point), point, "fun")
        if self.shape is None:
            self.shape = y.shape
        elif y.shape != self.shape:
            raise ValueError(
                f"fun returned shape {tuple(y.shape)} at one point and {tuple(self.shape)} at "
                "another; the output size must not depend on the input."
            )
        _check_finite(y, "fun's output")
        return y.to(self.x.dtype)
