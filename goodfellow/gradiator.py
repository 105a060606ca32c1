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

The pieces live in modules of their own, all re-exported here: :mod:`goodfellow.blackbox` (the
``torch.autograd.Function`` every gradiator runs through, :func:`wrap_numpy`,
:class:`CallCounter`), :mod:`goodfellow.jacobian_fit` (:func:`fit_jacobian`,
:func:`estimate_jacobian`) and :mod:`goodfellow.online_jacobian` (:class:`OnlineJacobian`); this
module holds :func:`gradiator` and :func:`fitted_gradiator`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from goodfellow._gradiator_checks import (
    _check_callable,
    _check_eps,
    _check_finite,
    _check_generator,
    _check_num_samples,
    _check_precision,
    _checked_output,
)
from goodfellow.blackbox import CallCounter, _gradiator, wrap_numpy
from goodfellow.jacobian_fit import _finite_difference_jacobians, estimate_jacobian, fit_jacobian
from goodfellow.online_jacobian import OnlineJacobian

__all__ = [
    "CallCounter",
    "OnlineJacobian",
    "estimate_jacobian",
    "fit_jacobian",
    "fitted_gradiator",
    "gradiator",
    "wrap_numpy",
]


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
