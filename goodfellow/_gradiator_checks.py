"""The checks of the gradiators: black boxes, their inputs and outputs, steps and fitting pairs.

Each public entry point of :mod:`goodfellow.gradiator` (and of :mod:`goodfellow.blackbox`,
:mod:`goodfellow.jacobian_fit`, :mod:`goodfellow.online_jacobian`) calls the ones it needs, so
that a bad argument or a misbehaving black box is refused with a message that says what is wrong
and how to fix it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from goodfellow._checks import check_same_kind, integer_number, real_number


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
    check_same_kind(dx, "dx", df, "df", "convert one")
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
