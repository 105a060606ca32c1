"""The argument checks of :mod:`goodfellow.kronecker`'s public functions.

Kept apart so that the module holds the KFAC/EKFAC formulas: one batch through one layer,
two factors that are finite, square and symmetric, a basis from
:func:`goodfellow.kronecker_eigenbasis` and tensors that match it, a damping that is positive
and finite.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from goodfellow._checks import check_feature_tensor, check_same_kind, real_number

if TYPE_CHECKING:
    from goodfellow.kronecker import KroneckerEigenbasis


def _check_batch(inputs: Tensor, grad_outputs: Tensor) -> None:
    """Check that ``inputs`` and ``grad_outputs`` come from one batch through one layer."""
    check_feature_tensor(inputs, "inputs")
    check_feature_tensor(grad_outputs, "grad_outputs")
    if inputs.shape[:-1] != grad_outputs.shape[:-1]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} must agree "
            "in every dimension but the last (the batch, then any positions): pass the input and "
            "the output gradient recorded for the same layer and batch."
        )
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0): curvature needs at least one example.")
    check_same_kind(inputs, "inputs", grad_outputs, "grad_outputs")


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
    check_same_kind(
        t, name, basis.input_eigenvectors, "the basis",
        "compute the basis from factors of the same dtype and device, or convert",
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


def _check_factors(A: Tensor, G: Tensor) -> None:
    """Refuse KFAC factors that :func:`kronecker_eigenbasis` would decompose into nonsense."""
    for name, factor in (("A", A), ("G", G)):
        if not isinstance(factor, Tensor) or not factor.is_floating_point():
            kind = f"a {factor.dtype}" if isinstance(factor, Tensor) else type(factor).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}.")
        if factor.dim() != 2 or factor.shape[0] != factor.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {tuple(factor.shape)}.")
        if not torch.isfinite(factor).all():
            raise FloatingPointError(
                f"the KFAC factor {name} has non-finite entries (inf or nan), so it has no "
                "eigenbasis; the layer's inputs or output gradients overflowed (lower the "
                "learning rate or check the loss)."
            )
        # eigh reads one triangle only: an asymmetric matrix would get a silently wrong basis.
        # Round-off in a computed second moment stays far below this bound.
        tolerance = 10 * math.sqrt(torch.finfo(factor.dtype).eps) * factor.abs().max()
        if (factor - factor.T).abs().max() > tolerance:
            raise ValueError(
                f"the KFAC factor {name} is not symmetric; it must be a second moment such as "
                "kfac_factors returns (symmetrize with (M + M.T) / 2 if it is one up to "
                "round-off)."
            )
    check_same_kind(A, "A", G, "G")
