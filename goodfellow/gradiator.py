r"""A learned backward ("gradiator") for black-box functions autograd cannot see through.

A black box :math:`f: \mathbb{R}^m \to \mathbb{R}^p` (NumPy code, a simulator, a compiled
library) can sit in the middle of a network as long as something supplies its backward: the
vector-Jacobian product (VJP)

.. math::

    \bar x^\top = \bar y^\top J_f(x), \qquad J_f(x) \in \mathbb{R}^{p \times m},

which turns the gradient :math:`\bar y` w.r.t. the output into the gradient :math:`\bar x` w.r.t.
the input. :func:`gradiator` wraps ``fun`` and any ``grad_fun`` computing that product in a
``torch.autograd.Function``.

When nobody can write :math:`J_f` down, it is *fitted*. Perturb the input by the rows of
:math:`dX \in \mathbb{R}^{k \times m}`, record the output changes :math:`dF \in \mathbb{R}^{k
\times p}`; to first order :math:`dF \approx dX J^\top`, and the least-squares fit with the least
norm is

.. math::

    \hat J^\top = dX^+ dF \qquad (\text{in columns: } \hat J = dF^\top (dX^\top)^+,
    \text{ i.e. } J \approx dF\,dX^+),

with :math:`dX^+` the Moore-Penrose pseudo-inverse, computed from the SVD of :math:`dX`
(:func:`fit_jacobian`). It exists for every :math:`dX`, whatever :math:`k`; forming the normal
equations :math:`(dX^\top dX)^{-1}` instead would square the condition number and fail outright
for :math:`k < m`. A single fitted :math:`\hat J` serves every :math:`\bar y`, since the VJP is
linear in :math:`\bar y`.

What the fit recovers:

* linear :math:`f` and :math:`k \ge m` independent perturbations: :math:`\hat J = J` exactly;
* linear :math:`f` and :math:`k < m` random directions: :math:`\hat J = J P` with :math:`P` the
  orthogonal projector onto their span, and since a uniformly random :math:`k`-dimensional
  subspace has :math:`\mathbb{E}[P] = \frac{k}{m} I`,
  :math:`\mathbb{E}\|J - \hat J\|_F^2 = (1 - \frac km)\|J\|_F^2`: relative error about
  :math:`\sqrt{1 - k/m}`;
* smooth :math:`f`, steps of length :math:`\varepsilon`: one-sided differences
  :math:`f(x + dx) - f(x)` have error :math:`O(\varepsilon)`, central differences
  :math:`\frac12(f(x + dx) - f(x - dx))` :math:`O(\varepsilon^2)`, plus a round-off error of
  about :math:`u \|f\| / \varepsilon` (:math:`u` the unit round-off) that wins for small
  :math:`\varepsilon`.

Three backwards are built on this: :func:`gradiator` with an exact ``grad_fun``;
:func:`fitted_gradiator`, which fits :math:`J_f(x)` afresh at every input (:math:`k + 1` or
:math:`2k` black-box evaluations per example and step); and :class:`OnlineJacobian`, which keeps one
estimate across calls and refines it by recursive least squares from a few probes per step.
:func:`wrap_numpy` turns a NumPy function into the torch-in, torch-out ``fun`` they expect, and
:class:`CallCounter` counts how often the black box runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from goodfellow._checks import integer_number, is_real, real_number

__all__ = [
    "CallCounter",
    "OnlineJacobian",
    "estimate_jacobian",
    "fit_jacobian",
    "fitted_gradiator",
    "gradiator",
    "wrap_numpy",
]


# The online state sums round-off over many updates, so directions explored less than sqrt(u)
# relative to the best-explored one count as unexplored (their pairs carry no reliable digits).
_STATE_RTOL = math.sqrt(torch.finfo(torch.float64).eps)


# ----------------------------------------------------------------------------------------------
# The autograd.Function


class _GradiatorFunction(torch.autograd.Function):
    """``y = fun(x)`` forward, ``grad_fun(x, grad_output)`` backward.

    ``fitted`` names a backward that fits :math:`J_f` numerically (``None`` for a user's
    ``grad_fun``). Such a backward knows nothing of how :math:`J_f` changes with ``x``: under
    ``create_graph=True`` its result is differentiable w.r.t. ``grad_output`` only, and a
    second derivative through it would silently lack the black box's curvature. So there the
    result is computed without a graph and marked so that differentiating it raises.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        fun: Callable[[Tensor], Tensor],
        grad_fun: Callable[[Tensor, Tensor], Tensor],
        fitted: str | None,
    ) -> Tensor:  # noqa: D102
        y = _checked_output(fun(x), x, "fun")
        # a nan from a black box would surface only later, far from its cause
        _check_finite(y, "fun's output")
        ctx.grad_fun, ctx.fitted = grad_fun, fitted
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None  # nobody asked for dL/dx: don't pay for grad_fun
        (x,) = ctx.saved_tensors
        # grad mode is on in a backward exactly when it runs with create_graph=True
        refuse_twice = ctx.fitted is not None and torch.is_grad_enabled()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not refuse_twice):
            grad_input = ctx.grad_fun(x, grad_output)
        if not isinstance(grad_input, Tensor):
            raise TypeError(
                f"grad_fun must return a torch.Tensor (the gradient w.r.t. x), got "
                f"{type(grad_input).__name__}."
            )
        if grad_input.shape != x.shape:
            raise ValueError(
                f"grad_fun returned shape {tuple(grad_input.shape)} for x of shape "
                f"{tuple(x.shape)}: it must return the gradient w.r.t. x, "
                "grad_output @ J_f(x), with the shape of x."
            )
        if refuse_twice:
            # x and grad_output as inputs: a second backward to anything before them must pass
            # through the refusing node (autograd skips nodes that lead to no wanted input)
            grad_input = _NoSecondDerivative.apply(grad_input.detach(), x, grad_output, ctx.fitted)
        return grad_input, None, None, None


class _NoSecondDerivative(torch.autograd.Function):
    """The identity, whose backward raises: a first derivative that must not be differentiated.

    The first-order result keeps its value (and ``create_graph=True`` for other parts of a
    graph keeps working); only a backward through it, a Hessian or a gradient penalty that
    needs the black box's second derivative, fails.
    """

    @staticmethod
    def forward(
        ctx, grad_input: Tensor, x: Tensor, grad_output: Tensor, fitted: str
    ) -> Tensor:  # noqa: D102
        ctx.fitted = fitted
        return grad_input.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> None:  # noqa: D102
        raise RuntimeError(
            f"{ctx.fitted} has no second derivative: its backward fits the black box's "
            "Jacobian J_f(x) from finite differences and knows nothing of how J_f changes with "
            "x, so differentiating its gradient again (a backward with create_graph=True "
            "followed by a second one: Hessians, gradient penalties) would silently leave out "
            "the black box's curvature. Use goodfellow.gradiator with a grad_fun written in "
            "differentiable torch operations if you need second derivatives."
        )


def gradiator(
    fun: Callable[[Tensor], Tensor], grad_fun: Callable[[Tensor, Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    r"""Wrap a black box and its backward into a function autograd can differentiate through.

    Forward: ``y = fun(x)``. Backward: ``grad_fun(x, grad_output)``, which must return
    :math:`\bar y^\top J_f(x)`, the gradient w.r.t. ``x``. ``grad_fun`` is not called when ``x``
    needs no gradient. With an exact ``grad_fun``, ``torch.autograd.gradcheck`` passes.

    Args:
        fun: The black box, torch tensors in and out: ``x`` of shape ``(m,)`` gives ``(p,)``,
            a batch ``x`` of shape ``(n, m)`` gives ``(n, p)`` (row ``i`` is :math:`f(x_i)`).
            Wrap NumPy code with :func:`wrap_numpy`. It runs without autograd recording.
        grad_fun: ``grad_fun(x, grad_output)`` with ``grad_output`` of the shape of ``y``;
            returns the gradient w.r.t. ``x``, of the shape of ``x``. For a batch, row ``i`` is
            ``grad_output[i] @ J_f(x[i])``.

    Returns:
        A function ``x -> y`` usable anywhere in an autograd graph (a ``torch.autograd.Function``
        underneath). It is not a ``torch.func`` transform target (no ``vmap`` rule).

    Raises:
        TypeError: If ``fun`` or ``grad_fun`` is not callable. At call time: if ``x`` or what
            ``fun``/``grad_fun`` return is not a tensor.
        ValueError: At call time: if ``x`` is not 1-D or 2-D, ``fun`` returns a shape that does
            not match ``x`` (rank, or batch size) or non-finite values, or ``grad_fun`` returns
            a shape other than ``x``'s.

    Example:
        >>> A = torch.randn(3, 4, dtype=torch.float64)
        >>> linear = gradiator(lambda x: x @ A.T, lambda x, g: g @ A)
        >>> x = torch.randn(4, dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.gradcheck(linear, (x,))
        True
    """
    _check_callable(fun, "fun")
    _check_callable(grad_fun, "grad_fun")
    return _gradiator(fun, grad_fun, None)


def _gradiator(
    fun: Callable[[Tensor], Tensor],
    grad_fun: Callable[[Tensor, Tensor], Tensor],
    fitted: str | None,
) -> Callable[[Tensor], Tensor]:
    """:func:`gradiator`; ``fitted`` names a fitted backward that refuses a second derivative."""

    def apply(x: Tensor) -> Tensor:
        _check_input(x)
        return _GradiatorFunction.apply(x, fun, grad_fun, fitted)

    return apply


# ----------------------------------------------------------------------------------------------
# Fitting a Jacobian by least squares


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


def fitted_gradiator(
    fun: Callable[[Tensor], Tensor],
    num_samples: int | None = None,
    eps: float = 1e-3,
    central: bool = True,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    r"""A :func:`gradiator` whose backward fits :math:`J_f(x_i)` afresh at every input.

    The backward estimates the Jacobian at each example (``x``, or each row of a batch) as
    :func:`estimate_jacobian` does and returns :math:`\bar y_i^\top \hat J_f(x_i)`. Accurate, but
    each backward costs ``2 * num_samples`` (central) or ``num_samples + 1`` (one-sided)
    black-box evaluations per example; :class:`OnlineJacobian` amortizes them across steps. For a
    batch, all perturbed points go to ``fun`` in one call, an ``(n * 2k, m)`` batch, and the
    ``n`` least-squares fits are one batched pseudo-inverse.

    Args:
        fun: The black box: ``(m,)`` to ``(p,)``, and ``(N, m)`` to ``(N, p)`` if the forward
            gets batches.
        num_samples: Directions per example; ``None`` (default) uses ``m``, which is exact for
            linear ``fun``.
        eps: Step length, as in :func:`estimate_jacobian`.
        central: Central (default) or one-sided differences.
        generator: Optional ``torch.Generator`` for the directions.

    Returns:
        A function ``x -> fun(x)`` usable in an autograd graph, as from :func:`gradiator`, but
        differentiable once: the fit gives :math:`J_f(x)` and nothing of how it changes with
        ``x``, so a second derivative through it (a backward with ``create_graph=True``, then
        a backward of that gradient) raises ``RuntimeError`` instead of silently dropping the
        black box's curvature.

    Raises:
        TypeError: For a ``num_samples``, ``eps`` or ``generator`` of the wrong type, here; at
            call time, as :func:`gradiator` and :func:`estimate_jacobian` do.
        ValueError: For ``num_samples < 1`` or ``eps <= 0``, here; for bad inputs or outputs of
            ``fun``, at call time, as :func:`gradiator` and :func:`estimate_jacobian` do.
    """
    _check_callable(fun, "fun")
    if num_samples is not None:
        num_samples = _check_num_samples(num_samples)
    eps = _check_eps(eps)
    _check_generator(generator)

    def grad_fun(x: Tensor, grad_output: Tensor) -> Tensor:
        _check_precision(x, "fitted_gradiator's input x")
        if x.shape[-1] == 0:
            raise ValueError("x has no features (shape (..., 0)): there is no Jacobian to fit.")
        if x.dim() == 2 and x.shape[0] == 0:
            return torch.zeros_like(x, dtype=grad_output.dtype)  # an empty batch: nothing to fit
        k = x.shape[-1] if num_samples is None else num_samples
        if x.dim() == 1:
            jacobian = estimate_jacobian(fun, x, k, eps, central, generator)  # (p, m)
            return grad_output @ jacobian.to(grad_output.dtype)  # (m,)

        def evaluate(points: Tensor) -> Tensor:
            values = _checked_output(fun(points), points, "fun")  # (N, p)
            _check_finite(values, "fun's output at the perturbed points")
            return values.to(x.dtype)

        with torch.no_grad():
            jacobians = _finite_difference_jacobians(
                evaluate, x.detach(), k, eps, central, generator
            )  # (n, p, m)
        return torch.einsum("np,npm->nm", grad_output, jacobians.to(grad_output.dtype))

    return _gradiator(fun, grad_fun, "fitted_gradiator")


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


# ----------------------------------------------------------------------------------------------
# NumPy black boxes and counting calls


def wrap_numpy(fun: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensor], Tensor]:
    """Turn a NumPy function into the torch-in, torch-out ``fun`` a gradiator expects.

    The wrapper hands ``fun`` a detached CPU copy of ``x`` as a NumPy array (a copy also on the
    CPU, where ``Tensor.numpy()`` alone would share memory: a black box that works in place,
    ``a -= a.mean()``, must not change the caller's tensor behind autograd's back) and returns
    the result as a new tensor (never sharing memory with ``x``) in ``x``'s dtype and on its
    device. A float64 NumPy computation on float32 inputs is therefore rounded back to float32.

    Args:
        fun: ``ndarray -> array-like``, e.g. ``lambda x: np.tanh(x @ A.T)``.

    Returns:
        The function ``Tensor -> Tensor``.

    Example:
        >>> double = wrap_numpy(lambda a: 2 * a)
        >>> double(torch.ones(2, dtype=torch.float32))
        tensor([2., 2.])
    """
    _check_callable(fun, "fun")

    def wrapped(x: Tensor) -> Tensor:
        result = fun(x.detach().cpu().numpy().copy())  # a copy of its own, even on the CPU
        return torch.tensor(np.asarray(result), dtype=x.dtype, device=x.device)

    wrapped.__name__ = getattr(fun, "__name__", "numpy_function")
    wrapped.__doc__ = getattr(fun, "__doc__", None)
    return wrapped


class CallCounter:
    """Wrap a black box and count its calls and the input points it evaluated.

    Args:
        fun: The black box.

    Attributes:
        num_calls: Number of calls.
        num_points: Number of input points evaluated: 1 per call on an ``(m,)`` tensor, ``n`` per
            call on an ``(n, m)`` batch (the cost that matters for a simulator).
    """

    def __init__(self, fun: Callable[[Tensor], Tensor]) -> None:
        _check_callable(fun, "fun")
        self.fun = fun
        self.num_calls = 0
        self.num_points = 0

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate ``fun(x)`` and count it."""
        self.num_calls += 1
        self.num_points += x.shape[0] if x.dim() == 2 else 1
        return self.fun(x)

    def __repr__(self) -> str:
        return f"CallCounter(num_calls={self.num_calls}, num_points={self.num_points})"


# ----------------------------------------------------------------------------------------------
# Checks


def _check_callable(fun: object, name: str) -> None:
    if not callable(fun):
        raise TypeError(f"{name} must be callable, got {type(fun).__name__}.")


def _check_input(x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() not in (1, 2):
        raise ValueError(
            f"x must have shape (m,) or a batch (n, m), got shape {tuple(x.shape)}; flatten "
            "extra dimensions first (x.reshape(n, -1)) and reshape the output after."
        )


def _check_point(x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor, got {kind}.")
    if x.dim() != 1:
        raise ValueError(
            f"x must be a single point of shape (m,), got shape {tuple(x.shape)}; estimate "
            "the Jacobian of each row of a batch separately."
        )
    if x.shape[0] == 0:
        raise ValueError("x has no entries (shape (0,)): there is no Jacobian to estimate.")
    _check_precision(x, "x")
    _check_finite(x, "x")


def _check_precision(x: Tensor, name: str) -> None:
    # half precision keeps 3 digits, and torch has no half QR/SVD on most devices
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name} is {x.dtype}: finite differences and least-squares fits need float32 or "
            "float64 (convert with .float() or .double())."
        )


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}."
        )


def _check_num_samples(num_samples: object) -> int:
    num_samples = integer_number(num_samples, "num_samples", "an int")
    if num_samples < 1:
        raise ValueError(
            f"num_samples must be at least 1, got {num_samples}: the fit needs one perturbation "
            "per direction it explores (m of them for an exact Jacobian of a linear map)."
        )
    return num_samples


def _check_eps(eps: object) -> float:
    eps = real_number(eps, "eps", "a real number")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(
            f"eps must be a finite step length > 0, got {eps!r}; near sqrt(u) one-sided and "
            "u**(1/3) central are best: about 1e-8 and 1e-5 in float64, 3e-4 and 5e-3 in "
            "float32 (for inputs and outputs of order 1)."
        )
    return eps


def _check_finite(t: Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(
            f"{name} holds non-finite values (nan or inf); a Jacobian fitted from them would be "
            "meaningless. Check the black box's domain, or use a smaller eps near its edges."
        )


def _check_pairs(dx: object, df: object) -> None:
    for name, t in (("dx", dx), ("df", df)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}.")
        if t.dim() < 2:
            raise ValueError(
                f"{name} must be 2-D with one pair per row, got shape {tuple(t.shape)}."
            )
    if dx.shape[:-1] != df.shape[:-1]:
        raise ValueError(
            f"dx and df must hold one row per pair, got shapes {tuple(dx.shape)} and "
            f"{tuple(df.shape)} (all but the last dimension must agree)."
        )
    if dx.dtype != df.dtype or dx.device != df.device:
        raise ValueError(
            f"dx is {dx.dtype} on {dx.device} but df is {df.dtype} on {df.device}: convert one."
        )
    _check_finite(dx, "dx")
    _check_finite(df, "df")


def _checked_output(y: object, x: Tensor, name: str) -> Tensor:
    """Check that ``y = fun(x)`` is a tensor of rank and batch size matching ``x``."""
    if not isinstance(y, Tensor):
        raise TypeError(
            f"{name} must return a torch.Tensor, got {type(y).__name__}; wrap NumPy code with "
            "goodfellow.wrap_numpy."
        )
    if y.dim() != x.dim() or (x.dim() == 2 and y.shape[0] != x.shape[0]):
        expected = "(p,)" if x.dim() == 1 else f"({x.shape[0]}, p)"
        raise ValueError(
            f"{name} returned shape {tuple(y.shape)} for x of shape {tuple(x.shape)}; it must "
            f"return {expected}: one output vector per input point."
        )
    if not y.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got {y.dtype}.")
    return y


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
