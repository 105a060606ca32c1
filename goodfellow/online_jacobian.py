r"""One Jacobian estimate kept across calls and refined by recursive least squares.

:class:`goodfellow.OnlineJacobian` is the gradiator that amortizes the fit: where
:func:`goodfellow.fitted_gradiator` spends :math:`k + 1` or :math:`2k` black-box evaluations per
example and step, it keeps the triangular factor of all pairs seen so far, absorbs a few probes
per step with one QR factorization, and answers every backward with the one estimate
:math:`\hat J`. Re-exported by :mod:`goodfellow.gradiator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from goodfellow._checks import integer_number, is_real
from goodfellow._gradiator_checks import (
    _check_callable,
    _check_eps,
    _check_finite,
    _check_generator,
    _check_input,
    _check_pairs,
    _check_precision,
    _checked_output,
)
from goodfellow.blackbox import CallCounter, _gradiator
from goodfellow.jacobian_fit import _random_directions

__all__ = ["OnlineJacobian"]


# The online state sums round-off over many updates, so directions explored less than sqrt(u)
# relative to the best-explored one count as unexplored (their pairs carry no reliable digits).
_STATE_RTOL = math.sqrt(torch.finfo(torch.float64).eps)


class OnlineJacobian:
    r"""A gradiator that keeps one Jacobian estimate and refines it by recursive least squares.

    The estimate is the weighted least-squares fit to every pair :math:`(dx_s, df_s)` seen so far,

    .. math::

        \hat J = \arg\min_J \sum_s w_s \|J\,dx_s - df_s\|^2 \quad (\text{least norm}),
        \qquad w_s = \lambda^{\text{number of updates after } s},

    with :math:`\lambda` = ``forgetting``. It is kept as the triangular factor of the weighted,
    stacked pairs: :math:`\sqrt{W}[dX \mid dF] = Q \begin{bmatrix} R & Z \\ 0 & \ast
    \end{bmatrix}`, so that :math:`\hat J^\top = R^+ Z`. A new block of pairs is absorbed by one
    QR factorization of :math:`\begin{bmatrix} \sqrt\lambda R & \sqrt\lambda Z \\ dX & dF
    \end{bmatrix}`, of size :math:`(m + k) \times (m + p)`: :math:`dX^\top dX` is never formed,
    and with ``forgetting=1`` the result is the same as refitting all pairs at once with
    :func:`fit_jacobian`. For linear ``fun`` it is exact once the pairs span
    :math:`\mathbb{R}^m`, after ``m / probes_per_call`` training steps, whatever the directions
    (Broyden's rank-one update, by contrast, is in general not exact after ``m`` non-orthogonal
    pairs).

    Calling the object runs ``fun`` forward; its backward is
    :math:`\bar y^\top \hat J`, at no black-box cost. When a backward can follow (grad mode on
    and ``x`` requiring grad), each call also spends ``probes_per_call`` one-sided probes: at
    randomly chosen rows :math:`x_i` of the batch it evaluates
    :math:`f(x_i + \varepsilon u)` in one batched call, pairs it with the :math:`f(x_i)` the
    forward already computed, and updates the estimate. A single :math:`\hat J` serves every
    input, so for non-linear ``fun`` it is a compromise between the local Jacobians of recent
    inputs (``forgetting < 1`` lets it follow them as they move).

    The state is kept in float64; the backward casts it to the gradient's dtype. The backward
    is differentiable once: a second derivative through it raises ``RuntimeError`` (the one
    :math:`\hat J` says nothing of the black box's curvature), as for :func:`fitted_gradiator`.

    Args:
        fun: The black box: ``(m,)`` to ``(p,)``, or ``(n, m)`` to ``(n, p)`` for batches.
        in_features: ``m``.
        out_features: ``p``.
        probes_per_call: Probes per differentiable call (0 disables them; then only
            :meth:`update` refines the estimate).
        eps: Probe step length :math:`\varepsilon > 0`.
        forgetting: :math:`\lambda \in (0, 1]`; ``1`` (default) weights all pairs equally.
        generator: Optional ``torch.Generator`` for the probe rows and directions.
        device: Where the state lives (default CPU).

    Attributes:
        counter: The :class:`CallCounter` wrapped around ``fun``; it counts the forwards and the
            probes.
        num_pairs: How many pairs the estimate has absorbed.

    Example:
        >>> A = torch.randn(2, 3, dtype=torch.float64)
        >>> online = OnlineJacobian(lambda x: x @ A.T, 3, 2, probes_per_call=3)
        >>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> online(x).sum().backward()  # the 3 probes make the estimate exact here
        >>> torch.allclose(online.jacobian, A), online.num_points
        (True, 8)
    """

    def __init__(
        self,
        fun: Callable[[Tensor], Tensor],
        in_features: int,
        out_features: int,
        *,
        probes_per_call: int = 1,
        eps: float = 1e-3,
        forgetting: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _check_callable(fun, "fun")
        for name, value, low in (
            ("in_features", in_features, 1),
            ("out_features", out_features, 1),
            ("probes_per_call", probes_per_call, 0),
        ):
            integer_number(value, name, "an int")
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}.")
        in_features, out_features = int(in_features), int(out_features)
        probes_per_call = int(probes_per_call)
        eps = _check_eps(eps)
        _check_generator(generator)
        if not is_real(forgetting) or not 0 < forgetting <= 1:
            raise ValueError(
                f"forgetting must be a number in (0, 1], got {forgetting!r}: 1 weights all "
                "pairs equally, 0.9 halves a pair's weight after about 7 updates."
            )
        self.counter = CallCounter(fun)
        self.in_features, self.out_features = in_features, out_features
        self.probes_per_call, self.eps, self.forgetting = probes_per_call, eps, float(forgetting)
        self.generator = generator
        self.num_pairs = 0
        options = {"dtype": torch.float64, "device": device}
        self._r = torch.zeros(in_features, in_features, **options)  # (m, m) upper triangular
        self._z = torch.zeros(in_features, out_features, **options)  # (m, p)
        self._jacobian: Tensor | None = torch.zeros(out_features, in_features, **options)
        self._apply = _gradiator(self.counter, self._vjp, "OnlineJacobian")

    @property
    def jacobian(self) -> Tensor:
        r"""The current estimate :math:`\hat J`, shape ``(p, m)``, float64."""
        if self._jacobian is None:
            pseudo_inverse = torch.linalg.pinv(self._r, rtol=_STATE_RTOL)  # (m, m)
            self._jacobian = (pseudo_inverse @ self._z).T  # (p, m)
        return self._jacobian

    @property
    def num_calls(self) -> int:
        """How many times ``fun`` was called (forwards and probes)."""
        return self.counter.num_calls

    @property
    def num_points(self) -> int:
        """At how many input points ``fun`` was evaluated (a batch of ``n`` counts ``n``)."""
        return self.counter.num_points

    def update(self, dx: Tensor, df: Tensor) -> None:
        """Absorb new pairs ``df ≈ dx @ J.T`` into the estimate (one QR of ``(m + k, m + p)``).

        Args:
            dx: Input perturbations, shape ``(k, m)``.
            df: Output changes, shape ``(k, p)``.

        Raises:
            TypeError: As :func:`fit_jacobian`, for pairs that are not floating-point tensors.
            ValueError: As :func:`fit_jacobian`, for malformed or non-finite pairs, and when the
                pairs are not 2-D or ``m`` or ``p`` differ from ``in_features``/``out_features``.
        """
        _check_pairs(dx, df)
        if dx.dim() != 2 or dx.shape[1] != self.in_features or df.shape[1] != self.out_features:
            raise ValueError(
                f"pairs of shapes {tuple(dx.shape)} and {tuple(df.shape)} do not fit a Jacobian "
                f"of {self.out_features} outputs by {self.in_features} inputs: dx must be "
                f"(k, {self.in_features}) and df (k, {self.out_features})."
            )
        decay = math.sqrt(self.forgetting)
        options = {"dtype": self._r.dtype, "device": self._r.device}
        stacked = torch.cat(
            [
                torch.cat([decay * self._r, decay * self._z], dim=1),  # (m, m + p)
                torch.cat([dx.to(**options), df.to(**options)], dim=1),  # (k, m + p)
            ]
        )  # (m + k, m + p)
        triangular = torch.linalg.qr(stacked, mode="r").R  # (min(m + k, m + p), m + p)
        m = self.in_features
        self._r, self._z = triangular[:m, :m], triangular[:m, m:]  # (m, m), (m, p)
        self._jacobian = None
        self.num_pairs += dx.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        """``fun(x)`` with the backward ``grad_output @ jacobian``; probes when training.

        Args:
            x: Shape ``(m,)`` or ``(n, m)``.

        Returns:
            ``fun(x)``, shape ``(p,)`` or ``(n, p)``.

        Raises:
            TypeError: If ``x`` is not a tensor, or not float32/float64 when it is probed.
            ValueError: If ``x`` does not have ``in_features`` in its last dimension, or ``fun``
                returns a number of outputs other than ``out_features``.
        """
        _check_input(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has {x.shape[-1]} features in its last dimension but this OnlineJacobian "
                f"was built for in_features={self.in_features}."
            )
        probing = self.probes_per_call > 0 and torch.is_grad_enabled() and x.requires_grad
        if probing:
            _check_precision(x, "x")
        y = self._apply(x)
        if y.shape[-1] != self.out_features:
            # caught here: the backward would fail on a matrix product far from the cause
            raise ValueError(
                f"fun returned {y.shape[-1]} outputs per point but this OnlineJacobian was "
                f"built for out_features={self.out_features}."
            )
        if probing and (x.dim() == 1 or x.shape[0] > 0):  # an empty batch has no row to probe
            with torch.no_grad():
                self._probe(x.detach(), y.detach())
        return y

    def _probe(self, x: Tensor, y: Tensor) -> None:
        """One-sided probes at random rows of the batch, reusing the forward's outputs."""
        points = x.unsqueeze(0) if x.dim() == 1 else x  # (n, m)
        values = y.unsqueeze(0) if y.dim() == 1 else y  # (n, p)
        generator = self.generator
        device = generator.device if generator is not None else x.device
        rows = torch.randint(
            points.shape[0], (self.probes_per_call,), generator=generator, device=device
        ).to(x.device)  # (q,)
        base = points[rows]  # (q, m)
        directions = _random_directions(1, self.probes_per_call, self.in_features, x, generator)[
            0
        ]  # (q, m)
        probes = base + self.eps * directions  # (q, m)
        if x.dim() == 1:  # fun is only known to take single points
            outputs = torch.stack([_checked_output(self.counter(p), p, "fun") for p in probes])
        else:
            outputs = _checked_output(self.counter(probes), probes, "fun")  # (q, p)
        _check_finite(outputs, "fun's output at the probes")
        self.update(probes - base, outputs.to(values.dtype) - values[rows])  # (q, m), (q, p)

    def _vjp(self, x: Tensor, grad_output: Tensor) -> Tensor:
        return grad_output @ self.jacobian.to(grad_output)  # (..., p) @ (p, m) -> (..., m)

    def __repr__(self) -> str:
        return (
            f"OnlineJacobian(in_features={self.in_features}, out_features={self.out_features}, "
            f"probes_per_call={self.probes_per_call}, eps={self.eps}, "
            f"forgetting={self.forgetting}, num_pairs={self.num_pairs})"
        )
