"""A black box inside autograd: the ``torch.autograd.Function`` of every gradiator, NumPy, counts.

Every gradiator of :mod:`goodfellow.gradiator` (:func:`goodfellow.gradiator`,
:func:`goodfellow.fitted_gradiator`, :class:`goodfellow.OnlineJacobian`) is one
``torch.autograd.Function``: the black box ``fun`` forward, a supplied vector-Jacobian product
backward, and, when that product comes from a fit of :math:`J_f`, a guard that refuses a second
derivative the fit cannot give. :func:`goodfellow.wrap_numpy` turns NumPy code into the
torch-in, torch-out ``fun`` it runs, and :class:`goodfellow.CallCounter` counts the black box's
calls. The names are re-exported by :mod:`goodfellow.gradiator`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from goodfellow._gradiator_checks import (
    _check_callable,
    _check_finite,
    _check_input,
    _checked_output,
)

__all__ = ["CallCounter", "wrap_numpy"]


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
