"""The argument checks of :mod:`goodfellow.kronecker`'s public functions.

Kept apart so that the module holds the KFAC/EKFAC formulas: one batch through one layer,
a basis from :func:`goodfellow.kronecker_eigenbasis` and tensors that match it, a damping
that is positive and finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from goodfellow._checks import real_number

if TYPE_CHECKING:
    from goodfellow.kronecker import KroneckerEigenbasis


def _check_batch(inputs: Tensor, grad_outputs: Tensor) -> None:
    """Check that ``inputs`` and ``grad_outputs`` come from one batch through one layer."""
    for name, t in (("inputs", inputs), ("grad_outputs", grad_outputs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor, got {t.dtype}: convert it with "
                ".float() or .double()."
            )
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have shape (n, ..., features), got shape {tuple(t.shape)}."
            )
    if inputs.shape[:-1] != grad_outputs.shape[:-1]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} must agree "
            "in every dimension but the last (the batch, then any positions): pass the input and "
            "the output gradient recorded for the same layer and batch."
        )
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0): curvature needs at least one example.")
    if inputs.dtype != grad_outputs.dtype or inputs.device != grad_outputs.device:
        raise ValueError(
            f"inputs is {inputs.dtype} on {inputs.device} but grad_outputs is "
            f"{grad_outputs.dtype} on {grad_outputs.device}; use one dtype on one device."
        )


def _check_basis(basis: object) -> None:
    from goodfellow.kronecker import KroneckerEigenbasis  # here: kronecker imports this module

    if not isinstance(basis, KroneckerEigenbasis):
        raise TypeError(
            f"basis must be a KroneckerEigenbasis (from kronecker_eigenbasis), got "
            f"{type(basis).__name__}."
        )


def _check_like_basis(t: object, name: str, basis: KroneckerEigenbasis) -> None:
    """``t`` must be a tensor in the basis's dtype and on its device, else matmuls fail deep."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    like = basis.input_eigenvectors
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} is {t.dtype} on {t.device} but the basis is {like.dtype} on {like.device}; "
            "compute the basis from factors of the same dtype and device, or convert."
        )


def _check_damping(damping: float) -> float:
    damping = real_number(damping, "damping", "a positive number")
    if not damping > 0 or damping == float("inf"):
        raise ValueError(
            f"damping must be positive and finite, got {damping}: it is the λ of "
            "(F̂ + λI)⁻¹ and keeps the directions of zero curvature from blowing up "
            "(1e-3 to 1e-1 times the typical scaling is a common start)."
        )
    return damping
