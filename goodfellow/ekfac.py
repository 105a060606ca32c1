r"""KFAC and EKFAC: curvature of a linear layer from what Goodfellow's trick records.

One linear layer holds the weight ``W`` ``(d_out, d_in)`` and the bias ``b`` ``(d_out,)``. They
are handled jointly as one matrix :math:`\bar W = [W \; b]` of shape ``(d_out, d_in + 1)``
acting on the input with a constant 1 appended, :math:`\bar a = (a, 1)`. Example ``n``'s own
gradient is then one outer product,

.. math::

    g_n = \frac{\partial L_n}{\partial \bar W} = \delta_n \bar a_n^\top, \qquad
    \delta_n = \frac{\partial L_n}{\partial z_n},

where :math:`\delta_n` is the gradient of example ``n``'s **own** loss w.r.t. the layer's output:
autograd's row of :math:`\partial \mathcal{L} / \partial Z` times
:func:`goodfellow.batch_size_factor` (times ``n`` under ``reduction="mean"``).

Flattening row by row (``torch.flatten``'s order, so :math:`\operatorname{vec}(\delta \bar a^\top)
= \delta \otimes \bar a`), the layer's block of the empirical Fisher is an **expectation** over
the examples,

.. math::

    F = \mathbb{E}_n\!\left[\operatorname{vec}(g_n) \operatorname{vec}(g_n)^\top\right]
      = \mathbb{E}_n\!\left[\delta_n \delta_n^\top \otimes \bar a_n \bar a_n^\top\right].

* **KFAC** (Martens & Grosse 2015, arXiv:1503.05671) takes the expectation of each factor
  separately, :math:`F \approx G \otimes A` with :math:`G = \mathbb{E}[\delta \delta^\top]` and
  :math:`A = \mathbb{E}[\bar a \bar a^\top]`. With the eigendecompositions
  :math:`G = U_G \operatorname{diag}(\lambda_G) U_G^\top` and
  :math:`A = U_A \operatorname{diag}(\lambda_A) U_A^\top` it is diagonal in the Kronecker
  eigenbasis :math:`Q = U_G \otimes U_A`, with the eigenvalue products
  :math:`\lambda_{G,o} \lambda_{A,i}` on the diagonal.
* **EKFAC** (George et al. 2018, arXiv:1806.03884) keeps the basis :math:`Q` but replaces the
  diagonal by the exact second moments of the gradients projected onto it,

  .. math::

      S^*_{oi} = \mathbb{E}_n\!\left[\left(U_G^\top g_n U_A\right)_{oi}^2\right]
               = \mathbb{E}_n\!\left[(U_G^\top \delta_n)_o^2\, (U_A^\top \bar a_n)_i^2\right],

  the best diagonal in that basis: :math:`Q \operatorname{diag}(S^*) Q^\top` is never further
  (Frobenius) from :math:`F` than KFAC is.

Both precondition the batch gradient :math:`\hat g` by :math:`(\hat F + \lambda I)^{-1}`, which in
the eigenbasis is an element-wise division:

.. math::

    (\hat F + \lambda I)^{-1} \operatorname{vec}(\hat g) = \operatorname{vec}\!\left(
        U_G \left[\frac{U_G^\top \hat g\, U_A}{S + \lambda}\right] U_A^\top\right),
    \qquad S = S^* \text{ (EKFAC)} \text{ or } \lambda_G \lambda_A^\top \text{ (KFAC)}.

So KFAC's damping here is exact Tikhonov damping of the Kronecker product,
:math:`(G \otimes A + \lambda I)^{-1}`, not the factored
:math:`(G + \sqrt\lambda I)^{-1} \otimes (A + \sqrt\lambda I)^{-1}`: the two methods then differ
only in :math:`S`, and a comparison between them measures nothing else.

:class:`EKFAC` (and :class:`KFAC`) is a ``torch.optim`` optimizer built on these functions: it
records :math:`\bar a` and :math:`\delta` through :class:`goodfellow.PerExampleGradients`,
keeps running averages of :math:`A`, :math:`G` and :math:`S^*`, and refreshes the eigenbasis
every ``update_freq`` steps.

Inputs with extra dimensions ``(n, ..., d_in)`` (a layer applied at several positions) use
KFAC-expand (Eschenhagen et al. 2023, arXiv:2311.00636): every position counts as an example of
``A`` and the positions of one example add up in ``G``; :math:`S^*` stays the exact second moment
of the per-example gradients :math:`g_n = \sum_t \delta_{n,t} \bar a_{n,t}^\top`. A Linear called
several times in one forward is treated the same way, its calls stacked as positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from goodfellow._checks import is_integer, is_real, real_number
from goodfellow.backprop import batched_outer
from goodfellow.hooks import LayerRecord, PerExampleGradients

__all__ = [
    "EKFAC",
    "KFAC",
    "KroneckerEigenbasis",
    "append_ones",
    "dense_curvature",
    "ekfac_scalings",
    "join_weight_bias",
    "kfac_factors",
    "kfac_scalings",
    "kronecker_eigenbasis",
    "precondition",
    "split_weight_bias",
]


class KroneckerEigenbasis(NamedTuple):
    """The eigendecompositions of one layer's two KFAC factors, :math:`A` and :math:`G`.

    Columns of the eigenvector matrices are the eigenvectors; eigenvalues are in ascending order
    (as ``torch.linalg.eigh`` returns them) and clamped at zero.
    """

    input_eigenvalues: Tensor
    r""":math:`\lambda_A`, shape ``(d_in + 1,)``."""
    input_eigenvectors: Tensor
    """:math:`U_A`, shape ``(d_in + 1, d_in + 1)``."""
    output_eigenvalues: Tensor
    r""":math:`\lambda_G`, shape ``(d_out,)``."""
    output_eigenvectors: Tensor
    """:math:`U_G`, shape ``(d_out, d_out)``."""


def append_ones(inputs: Tensor) -> Tensor:
    r"""The layer's input with a constant 1 appended, so the bias is one more weight column.

    Args:
        inputs: The layer's input :math:`a`, shape ``(n, ..., d_in)``.

    Returns:
        :math:`\bar a = (a, 1)`, shape ``(n, ..., d_in + 1)``.
    """
    ones = inputs.new_ones(*inputs.shape[:-1], 1)  # (n, ..., 1)
    return torch.cat([inputs, ones], dim=-1)  # (n, ..., d_in + 1)


def join_weight_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""Weight and bias (or their gradients) side by side, as the one matrix KFAC works on.

    Works the same on a batch of per-example gradients (leading dimensions are kept).

    Args:
        weight: Shape ``(..., d_out, d_in)``.
        bias: Shape ``(..., d_out)``, or ``None`` for a layer without bias.

    Returns:
        :math:`[W \; b]` of shape ``(..., d_out, d_in + 1)``, or ``weight`` itself without bias.

    Raises:
        ValueError: If ``bias`` is not ``weight``'s shape without its last dimension.
    """
    if bias is None:
        return weight
    if bias.shape != weight.shape[:-1]:
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not fit weight of shape "
            f"{tuple(weight.shape)}: a weight (..., d_out, d_in) takes a bias (..., d_out)."
        )
    return torch.cat([weight, bias.unsqueeze(-1)], dim=-1)  # (..., d_out, d_in + 1)


def split_weight_bias(matrix: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Undo :func:`join_weight_bias`.

    Args:
        matrix: Shape ``(..., d_out, d_in + 1)`` with bias, ``(..., d_out, d_in)`` without.
        has_bias: Whether the last column is the bias.

    Returns:
        ``(weight, bias)``: views of shapes ``(..., d_out, d_in)`` and ``(..., d_out)``
        (``bias`` is ``None`` when ``has_bias`` is false).
    """
    if not has_bias:
        return matrix, None
    return matrix[..., :-1], matrix[..., -1]


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


def kfac_factors(inputs: Tensor, grad_outputs: Tensor) -> tuple[Tensor, Tensor]:
    r"""KFAC's two factors of one layer: the second moments of its inputs and output gradients.

    :math:`A = \mathbb{E}[\bar a \bar a^\top]` and :math:`G = \mathbb{E}[\delta \delta^\top]`.
    Index letters: ``n`` example, ``t`` position (absent for ``(n, d)`` inputs), ``i``/``j``
    input features, ``o``/``p`` output features. ``A = einsum("nti,ntj->ij") / (n T)`` and
    ``G = einsum("nto,ntp->op") / n``: positions are averaged in ``A`` and summed in ``G``
    (KFAC-expand), which for ``(n, d)`` inputs is plain :math:`\frac1n \sum_n`.

    Args:
        inputs: The layer's input with the ones column, :math:`\bar a`, shape
            ``(n, ..., d_in + 1)`` (see :func:`append_ones`; ``(n, ..., d_in)`` for a layer
            without bias).
        grad_outputs: Per-example output gradients :math:`\delta_n = \partial L_n/\partial z_n`,
            shape ``(n, ..., d_out)``: autograd's ``dLoss/dZ`` times
            :func:`goodfellow.batch_size_factor`.

    Returns:
        ``(A, G)`` of shapes ``(d_in + 1, d_in + 1)`` and ``(d_out, d_out)``, symmetric.

    Raises:
        TypeError: If either argument is not a tensor.
        ValueError: If their shapes, dtypes or devices do not fit one batch through one layer.
    """
    _check_batch(inputs, grad_outputs)
    n = inputs.shape[0]
    a = inputs.reshape(-1, inputs.shape[-1])  # (n T, d_in + 1)
    delta = grad_outputs.reshape(-1, grad_outputs.shape[-1])  # (n T, d_out)
    A = a.T @ a / a.shape[0]  # (d_in + 1, d_in + 1)
    G = delta.T @ delta / n  # (d_out, d_out)
    return A, G


def kronecker_eigenbasis(A: Tensor, G: Tensor) -> KroneckerEigenbasis:
    """Eigendecompose both KFAC factors with ``torch.linalg.eigh``.

    The factors are positive semi-definite; round-off can still make a tiny eigenvalue come out
    negative, so eigenvalues are clamped at zero (the damping then keeps every denominator of
    :func:`precondition` positive).

    Args:
        A: Input factor, symmetric, shape ``(d_in + 1, d_in + 1)``.
        G: Output-gradient factor, symmetric, shape ``(d_out, d_out)``.

    Returns:
        The :class:`KroneckerEigenbasis` ``(λ_A, U_A, λ_G, U_G)``.

    Raises:
        TypeError: If a factor is not a floating-point tensor.
        ValueError: If a factor is not a square, symmetric matrix, or the two differ in dtype or
            device.
        FloatingPointError: If a factor has a non-finite entry.
    """
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
    if A.dtype != G.dtype or A.device != G.device:
        raise ValueError(
            f"A is {A.dtype} on {A.device} but G is {G.dtype} on {G.device}; use one dtype on "
            "one device."
        )
    input_eigenvalues, input_eigenvectors = torch.linalg.eigh(A)  # (d_in + 1,), (d_in + 1,)*2
    output_eigenvalues, output_eigenvectors = torch.linalg.eigh(G)  # (d_out,), (d_out, d_out)
    return KroneckerEigenbasis(
        input_eigenvalues=input_eigenvalues.clamp(min=0),
        input_eigenvectors=input_eigenvectors,
        output_eigenvalues=output_eigenvalues.clamp(min=0),
        output_eigenvectors=output_eigenvectors,
    )


def ekfac_scalings(inputs: Tensor, grad_outputs: Tensor, basis: KroneckerEigenbasis) -> Tensor:
    r"""EKFAC's diagonal: second moments of the per-example gradients in the Kronecker eigenbasis.

    :math:`S^*_{oi} = \mathbb{E}_n[(U_G^\top \delta_n)_o^2 (U_A^\top \bar a_n)_i^2]`. Projected onto
    the eigenbasis, example ``n``'s gradient is still an outer product,
    :math:`U_G^\top g_n U_A = (U_G^\top \delta_n)(U_A^\top \bar a_n)^\top`, and the square of
    an outer product is the outer product of the squares. So the mean over examples is one matrix
    product, ``einsum("no,ni->oi", (δ U_G)², (ā U_A)²) / n`` (``n`` example, ``o`` output and
    ``i`` input eigendirection): :math:`O(n\, d_{out} d_{in})` and no per-example gradient
    materialized. Inputs with positions ``(n, T, ...)`` do not factor this way (the gradient
    sums over positions before it is squared); there the projected per-example gradients are
    formed with :func:`goodfellow.batched_outer`, ``(n, d_out, d_in + 1)`` floats.

    Args:
        inputs: :math:`\bar a`, shape ``(n, ..., d_in + 1)``, as for :func:`kfac_factors`.
        grad_outputs: Per-example :math:`\delta`, shape ``(n, ..., d_out)``, as for
            :func:`kfac_factors`.
        basis: The layer's :class:`KroneckerEigenbasis`.

    Returns:
        :math:`S^*` of shape ``(d_out, d_in + 1)``, in the layout of the joint weight.

    Raises:
        TypeError: If ``inputs`` or ``grad_outputs`` is not a floating-point tensor, or ``basis``
            is not a :class:`KroneckerEigenbasis`.
        ValueError: If the shapes do not fit one layer and its basis, or the dtypes or devices
            differ from the basis's.
    """
    _check_batch(inputs, grad_outputs)
    _check_basis(basis)
    _check_like_basis(inputs, "inputs", basis)
    U_A, U_G = basis.input_eigenvectors, basis.output_eigenvectors
    if U_A.shape[0] != inputs.shape[-1] or U_G.shape[0] != grad_outputs.shape[-1]:
        raise ValueError(
            f"the basis is for {U_A.shape[0]} inputs and {U_G.shape[0]} outputs, but inputs has "
            f"{inputs.shape[-1]} features and grad_outputs {grad_outputs.shape[-1]}: use the "
            "basis of this layer's factors (and the inputs with their ones column)."
        )
    n = inputs.shape[0]
    a_rotated = inputs @ U_A  # (n, ..., d_in + 1): rows are (U_Aᵀ ā)ᵀ
    delta_rotated = grad_outputs @ U_G  # (n, ..., d_out): rows are (U_Gᵀ δ)ᵀ
    if inputs.dim() == 2:
        return delta_rotated.square().T @ a_rotated.square() / n  # (d_out, d_in + 1)
    rotated_grads = batched_outer(delta_rotated, a_rotated)  # (n, d_out, d_in + 1)
    return rotated_grads.square().mean(0)  # (d_out, d_in + 1)


def kfac_scalings(basis: KroneckerEigenbasis) -> Tensor:
    r"""KFAC's diagonal in the eigenbasis: the products of the factors' eigenvalues.

    :math:`\lambda_G \lambda_A^\top`, the eigenvalues of :math:`G \otimes A`.

    Args:
        basis: The layer's :class:`KroneckerEigenbasis`.

    Returns:
        Shape ``(d_out, d_in + 1)``: entry ``(o, i)`` is :math:`\lambda_{G,o} \lambda_{A,i}`, the
        eigenvalue of :math:`G \otimes A` for the eigenvector :math:`u_{G,o} \otimes u_{A,i}`.

    Raises:
        TypeError: If ``basis`` is not a :class:`KroneckerEigenbasis`.
    """
    _check_basis(basis)
    return torch.outer(basis.output_eigenvalues, basis.input_eigenvalues)  # (d_out, d_in + 1)


def _check_damping(damping: float) -> float:
    damping = real_number(damping, "damping", "a positive number")
    if not damping > 0 or damping == float("inf"):
        raise ValueError(
            f"damping must be positive and finite, got {damping}: it is the λ of "
            "(F̂ + λI)⁻¹ and keeps the directions of zero curvature from blowing up "
            "(1e-3 to 1e-1 times the typical scaling is a common start)."
        )
    return damping


def precondition(
    grad: Tensor, basis: KroneckerEigenbasis, scalings: Tensor, damping: float
) -> Tensor:
    r"""Apply :math:`(\hat F + \lambda I)^{-1}` to one layer's gradient, in the eigenbasis.

    :math:`\hat F = (U_G \otimes U_A) \operatorname{diag}(\operatorname{vec} S)
    (U_G \otimes U_A)^\top` is inverted by rotating into the eigenbasis, dividing element-wise
    and rotating back: :math:`U_G [(U_G^\top \hat g U_A) / (S + \lambda)] U_A^\top`, two
    matrix products each way instead of a :math:`(d_{out} d_{in})^2` solve.

    Args:
        grad: The gradient :math:`\hat g` of the joint weight, shape ``(d_out, d_in + 1)``
            (see :func:`join_weight_bias`).
        basis: The layer's :class:`KroneckerEigenbasis`.
        scalings: The diagonal :math:`S`, shape ``(d_out, d_in + 1)``: :func:`ekfac_scalings`
            for EKFAC, :func:`kfac_scalings` for KFAC.
        damping: :math:`\lambda > 0`.

    Returns:
        The preconditioned gradient, shape ``(d_out, d_in + 1)``.

    Raises:
        TypeError: If ``damping`` is not a number, ``basis`` not a :class:`KroneckerEigenbasis`,
            or ``grad`` or ``scalings`` not a tensor.
        ValueError: If ``damping`` is not positive, the shapes, dtypes or devices do not agree
            with the basis's, or a scaling is negative.
    """
    damping = _check_damping(damping)
    _check_basis(basis)
    U_A, U_G = basis.input_eigenvectors, basis.output_eigenvectors
    expected = (U_G.shape[0], U_A.shape[0])
    for name, t in (("grad", grad), ("scalings", scalings)):
        _check_like_basis(t, name, basis)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have the shape (d_out, d_in + 1) = {expected} of the basis, got "
                f"{tuple(t.shape)}; join weight and bias with join_weight_bias first."
            )
    # S is a second moment or a product of eigenvalues: a negative entry would make S + λ
    # vanish or flip sign and the step blow up or point uphill.
    if bool((scalings < 0).any()):
        raise ValueError(
            "scalings must be non-negative (second moments, from ekfac_scalings, or eigenvalue "
            f"products, from kfac_scalings), got a minimum of {scalings.min().item():g}."
        )
    rotated = U_G.T @ grad @ U_A  # (d_out, d_in + 1)
    return U_G @ (rotated / (scalings + damping)) @ U_A.T  # (d_out, d_in + 1)


def dense_curvature(basis: KroneckerEigenbasis, scalings: Tensor) -> Tensor:
    r"""The approximate Fisher block of one layer as a dense matrix.

    :math:`\hat F = Q \operatorname{diag}(\operatorname{vec} S) Q^\top` with
    :math:`Q = U_G \otimes U_A`. Rows and columns are in ``torch.flatten`` order of the
    ``(d_out, d_in + 1)`` joint weight (entry ``o * (d_in + 1) + i``), so :math:`\hat F` lines up
    with the flattened per-example gradients. It has :math:`(d_{out}(d_{in}+1))^2` entries:
    for tests and small layers only.

    Args:
        basis: The layer's :class:`KroneckerEigenbasis`.
        scalings: The diagonal :math:`S`, shape ``(d_out, d_in + 1)``.

    Returns:
        Shape ``(d_out (d_in + 1), d_out (d_in + 1))``, symmetric. With :func:`kfac_scalings`
        it equals :math:`G \otimes A`.

    Raises:
        TypeError: If ``basis`` is not a :class:`KroneckerEigenbasis` or ``scalings`` not a
            tensor.
        ValueError: If ``scalings`` does not have the basis's shape, dtype and device.
    """
    _check_basis(basis)
    _check_like_basis(scalings, "scalings", basis)
    expected = (basis.output_eigenvectors.shape[0], basis.input_eigenvectors.shape[0])
    if tuple(scalings.shape) != expected:
        raise ValueError(
            f"scalings must have the shape (d_out, d_in + 1) = {expected} of the basis, got "
            f"{tuple(scalings.shape)}."
        )
    # P = d_out (d_in + 1); kron(U_G, U_A) matches the row-major vec: vec(δ āᵀ) = δ ⊗ ā.
    Q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)  # (P, P)
    return (Q * scalings.reshape(1, -1)) @ Q.T  # (P, P)


# ---------------------------------------------------------------------------------------------
# The optimizer


def _check_group(group: dict) -> dict:
    """Check the hyperparameters, at construction and again at every step.

    A scheduler or the user may have changed ``param_groups[0]`` in between. ``lr = 0`` is
    allowed, as in torch's optimizers: a warm-up schedule such as
    ``LambdaLR(optimizer, lambda s: s / 100)`` starts there, and the step then gathers the
    curvature statistics without moving the parameters. NumPy scalars count as numbers.

    Returns:
        The four hyperparameters as Python ``float`` and ``int``.
    """
    lr = real_number(group["lr"], "lr", "a non-negative number")
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(
            f"lr must be non-negative and finite, got {lr}: it scales every step (try 0.01 to "
            "1 for EKFAC; 0 gathers statistics without moving the parameters)."
        )
    damping = _check_damping(group["damping"])
    update_freq, decay = group["update_freq"], group["decay"]
    if not is_integer(update_freq) or update_freq < 1:
        raise ValueError(
            f"update_freq must be an integer >= 1, got {update_freq!r}: it is the number of "
            "steps between two eigendecompositions (1 = every step)."
        )
    if not is_real(decay) or not 0 <= decay < 1:
        raise ValueError(
            f"decay must be a number in [0, 1), got {decay!r}: it weighs the past in the "
            "running averages (0 = current batch only; 0.95 is common)."
        )
    return {"lr": lr, "damping": damping, "update_freq": int(update_freq), "decay": float(decay)}


def _check_finite(tensor: Tensor, what: str, layer: str, step: int) -> None:
    """Refuse a non-finite curvature statistic before it reaches the optimizer's state."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"EKFAC step {step}: the {what} of Linear {layer!r} has non-finite entries (inf or "
            "nan), so no parameter was changed. The layer's inputs or output gradients "
            "overflowed or the loss is not finite: lower the learning rate, raise the damping, "
            "or check the data."
        )


def _stack_calls(tensors: list[Tensor], n: int) -> Tensor:
    """One tensor per call of a layer -> one; several calls become extra positions."""
    if len(tensors) == 1:
        return tensors[0]  # (n, ..., d)
    return torch.cat([t.reshape(n, -1, t.shape[-1]) for t in tensors], dim=1)  # (n, T, d)


class EKFAC(torch.optim.Optimizer):
    r"""EKFAC (or KFAC) preconditioned gradient descent for models made of ``nn.Linear`` layers.

    Used like any ``torch.optim`` optimizer, with one forward and one ``loss.backward()`` of
    the model per step::

        optimizer = goodfellow.EKFAC(model, lr=0.1, damping=1e-3, update_freq=10)
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)  # reduction="mean"
            loss.backward()
            optimizer.step()

    The optimizer keeps a :class:`goodfellow.PerExampleGradients` attached to the model (remove
    it with :meth:`remove_hooks`) and reads, for every Linear, its inputs :math:`a` and the
    per-example output gradients :math:`\delta` of the step's batch; no per-example gradient is
    materialized. Calls of a Linear whose output did not reach the loss (a forward run with
    gradients enabled but never differentiated) are left out of the statistics.

    Each step uses the curvature of **one batch**, the one whose ``backward()`` came last, so
    :meth:`step` refuses what would mix batches or lose one, instead of stepping wrongly:

    * a forward with gradients enabled after the ``backward()`` (an evaluation batch, or the
      forward of a ``copy.deepcopy`` of the model) starts a new batch without a backward: run
      evaluation under ``torch.no_grad()``;
    * gradient accumulation, several forward and ``backward()`` pairs before one step: ``.grad``
      sums the micro-batches, but KFAC's factors and EKFAC's scalings are second moments of
      one batch's per-example gradients and the recorder keeps the last micro-batch only. Step
      after every backward, or use one larger batch;
    * a batch left over from a forward that raised, or from a backward not meant for a step:
      drop it with :meth:`clear`.

    Per layer and step ``k`` (counted from 0), with :math:`\beta` = ``decay``:

    1. running averages of the KFAC factors,
       :math:`A \leftarrow \beta A + (1 - \beta) A_{batch}` and likewise :math:`G`
       (:func:`kfac_factors`; the first batch initializes them);
    2. if ``k % update_freq == 0``: a new eigenbasis of :math:`A` and :math:`G`
       (:func:`kronecker_eigenbasis`); the scalings restart from this batch, since the old
       ones belong to the old basis;
    3. EKFAC: running average of the scalings in the current basis,
       :math:`S \leftarrow \beta S + (1 - \beta) S^*_{batch}` (:func:`ekfac_scalings`, every
       step). KFAC: :math:`S = \lambda_G \lambda_A^\top` of the last eigenbasis
       (:func:`kfac_scalings`);
    4. :math:`[W \; b] \leftarrow [W \; b] - \eta\,` :func:`precondition`
       :math:`([\nabla_W \; \nabla_b], S, \lambda)`, i.e.
       :math:`\theta \leftarrow \theta - \eta (\hat F + \lambda I)^{-1} \nabla_\theta \mathcal{L}`
       with :math:`\nabla_\theta \mathcal{L}` the ``.grad`` autograd accumulated.

    :math:`\hat F` approximates the empirical Fisher :math:`\mathbb{E}_n[g_n g_n^\top]` of the
    examples' own losses, whatever the reduction. The preconditioned gradient is the batch
    loss's: with ``loss_reduction="sum"`` it is ``n`` times the mean's, and so is the step.

    Args:
        model: A module whose ``nn.Linear`` and ungrouped ``nn.Conv1d/2d/3d`` layers are
            preconditioned; a convolution's Kronecker factors come from its unfolded patches
            (KFC, Grosse & Martens 2016, arXiv:1602.01407): every output position counts as a
            position of KFAC-expand. Trainable parameters of other layers the recorder
            supports (grouped convolutions, and any layer without Kronecker factors) take a
            plain gradient-descent step with the same ``lr``.
        lr: Learning rate :math:`\eta \ge 0` (``0``, as a warm-up schedule starts, updates the
            statistics and leaves the parameters alone).
        damping: :math:`\lambda > 0`, added to every eigenvalue of :math:`\hat F`.
        update_freq: Recompute the eigenbases every ``update_freq`` steps (an integer
            :math:`\ge 1`); the scalings are updated every step. Like ``lr``, ``damping`` and
            ``decay`` it may be a NumPy scalar.
        decay: :math:`\beta \in [0, 1)`, the weight of the past in the running averages
            (``0``: use only the current batch).
        mode: ``"ekfac"`` (scalings :math:`S^*`) or ``"kfac"`` (eigenvalue products).
        loss_reduction: How the loss is reduced over the batch, ``"mean"`` (torch's default)
            or ``"sum"``; sets the batch-size factor that turns recorded output gradients into
            per-example ones.
        group: A ``torch.distributed`` process group over data-parallel workers: the batch
            statistics :math:`A`, :math:`G` and :math:`S^*` of every step are averaged over
            all ranks' examples (weighted by each rank's number of examples, as distributed
            K-FAC does: Osawa et al. 2019, Pauloski et al. 2020), so every rank holds the same
            preconditioner. The gradient is ``.grad`` as it is: wrap the model in
            ``DistributedDataParallel``, whose all-reduce makes it the global one. Two
            all-reduces per layer and step, of :math:`O(d_{in}^2 + d_{out}^2)` and
            :math:`O(d_{in} d_{out})` numbers.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or ``lr`` or ``damping`` is not a
            number.
        ValueError: If the model has no trainable ``nn.Linear``, holds other trainable
            parameters, ties weights between Linear layers, or an argument is out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float = 1e-3,
        update_freq: int = 10,
        decay: float = 0.95,
        mode: str = "ekfac",
        loss_reduction: str = "mean",
        group: object = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        defaults = _check_group(
            {"lr": lr, "damping": damping, "update_freq": update_freq, "decay": decay}
        )
        if mode not in ("ekfac", "kfac"):
            raise ValueError(f"mode must be 'ekfac' or 'kfac', got {mode!r}.")
        for name, module in model.named_modules():
            if (
                _is_kronecker_layer(module)
                and module.bias is not None
                and module.bias.requires_grad
                and not module.weight.requires_grad
            ):
                raise ValueError(
                    f"{type(module).__name__} {name!r} has a frozen weight but a trainable "
                    "bias; EKFAC treats "
                    "weight and bias as one matrix: freeze both or neither."
                )
        recorder = PerExampleGradients(model, loss_reduction=loss_reduction)
        try:
            recorder.attach()
        except ValueError as error:
            raise ValueError(f"EKFAC cannot precondition this model: {error}") from error
        # A Linear inside a module that uses its weight itself (nn.MultiheadAttention's
        # out_proj) belongs to that module's rule: it has no record, and no Kronecker factors.
        linears = [
            (name, module)
            for name, module in model.named_modules()
            if _is_kronecker_layer(module)
            and module.weight.requires_grad
            and name in recorder.layers
        ]
        if not linears:
            recorder.detach()
            raise ValueError(
                f"the model ({type(model).__name__}) has no nn.Linear layer with trainable "
                "weights: EKFAC preconditions nn.Linear and ungrouped nn.Conv1d/2d/3d layers "
                "only."
            )
        owner: dict[int, str] = {}
        for name, module in linears:
            for param in module.parameters():
                if id(param) in owner:
                    recorder.detach()
                    raise ValueError(
                        f"Linear {name!r} shares a parameter with Linear {owner[id(param)]!r}; "
                        "the Fisher of a tied weight is not one Kronecker product per layer, "
                        "so EKFAC does not handle tied weights (untie them, or apply one "
                        "Linear module twice instead)."
                    )
                owner[id(param)] = name
        self.model = model
        self.mode = mode
        self.loss_reduction = loss_reduction
        self.group = group
        self.recorder = recorder
        """The :class:`goodfellow.PerExampleGradients` that records each batch."""
        self._layers = {name: module for name, module in linears}
        params = [
            p for module in self._layers.values() for p in module.parameters() if p.requires_grad
        ]
        # Parameters of layers without Kronecker factors (norm layers, embeddings, grouped
        # convolutions): plain gradient descent with the same lr.
        kronecker = {id(p) for p in params}
        self._plain = [p for p in model.parameters() if p.requires_grad and id(p) not in kronecker]
        params = params + self._plain
        self._building = True  # torch.optim.Optimizer.__init__ adds the one group itself
        super().__init__(params, defaults)
        self._building = False
        # The recorder counts the batches it started (attach() started one); a step sees the
        # count it left behind unless a second batch was recorded in between.
        self._batches_at_step = recorder.batches_started

    def remove_hooks(self) -> None:
        """Take the recording hooks off the model; :meth:`step` then refuses to run."""
        self.recorder.detach()

    def clear(self) -> None:
        """Drop the batch recorded since the last step, so the next forward starts afresh.

        For a forward that raised half-way (a bad batch skipped with ``try``/``except``: its
        first layers were recorded, and a next batch of another size would be refused as part
        of it), or a forward and backward not meant for a step. The gradients in ``.grad`` are
        left alone: call ``zero_grad()`` as well if a backward ran. Clear through this
        method, not through ``recorder.clear()``: :meth:`step` would take a batch cleared behind
        its back for a second, accumulated one.
        """
        self.recorder.clear()
        self._batches_at_step = self.recorder.batches_started

    def add_param_group(self, param_group: dict) -> None:
        """Refused: EKFAC preconditions the Linear layers of its model, as one parameter group.

        Raises:
            ValueError: Always, once the optimizer is built (a group added later would never
                be preconditioned nor stepped).
        """
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        raise ValueError(
            "EKFAC cannot take another parameter group: it is built from a model and "
            "preconditions that model's Linear layers, one group whose curvature it records. "
            "Give other parameters an optimizer of their own (torch.optim.SGD, say), and change "
            "lr or damping through optimizer.param_groups[0]."
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` of an EKFAC (or KFAC) of the same model.

        The state is checked against this optimizer before anything is loaded: its number of
        parameters, the mode (a KFAC state has no scalings), and the shape of every saved
        statistic of every layer, so that a state of another model fails here, naming the
        layer, and not at a later step with a ``KeyError`` or a size mismatch.

        Args:
            state_dict: What ``state_dict()`` returned.

        Raises:
            TypeError: If ``state_dict`` is not a dict with ``"state"`` and ``"param_groups"``.
            ValueError: If it belongs to another mode, or to a model with other layers or
                widths.
        """
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)

    def _check_state_dict(self, state_dict: dict) -> None:
        if not (
            isinstance(state_dict, dict)
            and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)
        ):
            raise TypeError(
                "state_dict must be what EKFAC.state_dict() returned: a dict with 'state' and "
                f"'param_groups', got {type(state_dict).__name__}."
            )
        groups = state_dict["param_groups"]
        saved = sum(len(group.get("params", ())) for group in groups)
        own = len(self.param_groups[0]["params"])
        if len(groups) != 1 or saved != own:
            layers = ", ".join(repr(name) for name in self._layers)
            raise ValueError(
                f"the saved state holds {saved} parameters in {len(groups)} group(s), but this "
                f"EKFAC optimizes {own} in one group (Linear layers {layers}): it was saved for "
                "another model."
            )
        index = {id(p): k for k, p in enumerate(self.param_groups[0]["params"])}
        saved_ids = list(groups[0]["params"])  # the saved indices, in this optimizer's order
        entries = state_dict["state"]
        mine = "EKFAC" if self.mode == "ekfac" else "KFAC"
        for name, module in self._layers.items():
            entry = entries.get(saved_ids[index[id(module.weight)]])
            if entry is None:
                continue  # the layer had not stepped yet when the state was saved
            d_out = module.out_features
            d_in = module.in_features + int(_has_trainable_bias(module))
            shapes = {
                "A": (d_in, d_in),
                "G": (d_out, d_out),
                "input_eigenvalues": (d_in,),
                "input_eigenvectors": (d_in, d_in),
                "output_eigenvalues": (d_out,),
                "output_eigenvectors": (d_out, d_out),
            }
            if self.mode == "ekfac":
                shapes["scalings"] = (d_out, d_in)
                if "scalings" not in entry and "A" in entry:
                    raise ValueError(
                        f"Linear {name!r}: the saved state has no 'scalings', so it was saved "
                        "by KFAC (mode='kfac'); load it into goodfellow.KFAC, or start EKFAC "
                        "afresh."
                    )
            elif "scalings" in entry:
                raise ValueError(
                    f"Linear {name!r}: the saved state holds EKFAC's 'scalings', so it was "
                    f"saved by EKFAC (mode='ekfac'), not by {mine}; load it into "
                    "goodfellow.EKFAC."
                )
            missing = sorted(set(shapes) - set(entry))
            if missing:
                raise ValueError(
                    f"Linear {name!r}: the saved state lacks {missing}; it was not saved by "
                    f"{mine} (keys {sorted(entry)})."
                )
            for key, shape in shapes.items():
                value = entry[key]
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                if got != shape:
                    raise ValueError(
                        f"Linear {name!r} (in_features={module.in_features}, out_features="
                        f"{d_out}, {'with' if _has_trainable_bias(module) else 'without'} "
                        f"trainable bias): {key!r} has shape {got} in the saved state, but this "
                        f"layer needs {shape}; the state was saved for a model with other layer "
                        "widths."
                    )
        weights = {saved_ids[index[id(module.weight)]] for module in self._layers.values()}
        stray = [key for key in entries if key not in weights]
        if stray:
            raise ValueError(
                f"the saved state holds statistics for parameters {stray} (by position), which "
                "are not Linear weights of this model: it was saved for another model."
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every Linear layer with its preconditioned gradient.

        Args:
            closure: Optional function that clears the gradients, runs the forward and
                ``loss.backward()`` and returns the loss (as for any torch optimizer).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            TypeError: If ``param_groups[0]`` was given a non-numeric ``lr`` or ``damping``.
            ValueError: If ``param_groups[0]`` was given an out-of-range ``lr``, ``damping``,
                ``update_freq`` or ``decay`` since construction (nothing is changed then).
            RuntimeError: If the hooks were removed, no forward and backward of the model
                was recorded since the last step, a forward with gradients enabled ran after the
                backward (an evaluation outside ``torch.no_grad()``), or several batches were
                recorded since the last step (gradient accumulation). Nothing is changed then.
            FloatingPointError: If a layer's curvature statistics are not finite (nothing is
                changed then, and the batch is dropped, as by :meth:`clear`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.recorder.attached:
            raise RuntimeError("EKFAC's hooks were removed (remove_hooks()); it cannot step.")
        if self.recorder.batch_size is None:
            raise RuntimeError(
                "EKFAC.step() found no batch recorded since the last step: run the model's "
                "forward and loss.backward() (with gradients enabled) before every step."
            )
        if not self.recorder.backward_seen:
            raise RuntimeError(
                "EKFAC.step() found a forward of the model without a backward: a forward with "
                "gradients enabled after loss.backward() (an evaluation batch, or a copy of the "
                "model) starts a new batch, and the one backward() belonged to is gone. Run "
                "evaluation under torch.no_grad(), or call loss.backward() before step(); "
                "optimizer.clear() drops a forward that is not meant for a step."
            )
        started = self.recorder.batches_started - self._batches_at_step + 1
        if started > 1:
            raise RuntimeError(
                f"EKFAC.step() found {started} batches recorded since the last step (a forward "
                "and backward() before the last forward and backward(), as in gradient "
                "accumulation over micro-batches): .grad sums them, but EKFAC's curvature "
                "statistics are per batch and only the last one is kept, so the step would be "
                "wrong. Call step() after every backward(), or use one larger batch; call "
                "optimizer.clear() (not optimizer.recorder.clear()) to drop a batch not meant "
                "for a step."
            )
        hyper = _check_group(self.param_groups[0])
        updates = []
        try:
            for name, module in self._layers.items():
                record = self.recorder.layers[name]
                reached = any(g is not None for g in record.grad_outputs)
                if module.weight.grad is None or not reached:
                    continue  # the layer took no part in this loss, like torch optimizers skip it
                updates.append(self._layer_update(name, module, record, hyper))
        except FloatingPointError:
            self.clear()  # the batch is unusable: the next one must not count as accumulated
            raise
        # Parameters change only once every layer's statistics were found finite.
        for module, new_state, step in updates:
            self.state[module.weight].update(new_state)
            weight, bias = split_weight_bias(step, _has_trainable_bias(module))
            module.weight.add_(weight.reshape(module.weight.shape), alpha=-hyper["lr"])
            if bias is not None:
                module.bias.add_(bias, alpha=-hyper["lr"])
        for param in self._plain:
            if param.grad is not None:
                param.add_(param.grad, alpha=-hyper["lr"])
        self.clear()  # the batch is used: the next step needs a new one
        return loss

    def _layer_update(
        self, name: str, module: nn.Linear, record: LayerRecord, group: dict
    ) -> tuple[nn.Linear, dict[str, Tensor | int], Tensor]:
        """The new state and the preconditioned gradient of one layer (state not yet written)."""
        state = self.state.get(module.weight, {})  # .get: a failed step leaves no trace
        step = state.get("step", 0)
        decay = group["decay"]
        has_bias = _has_trainable_bias(module)
        # The layer's rule gives the inputs (unfolded patches for a convolution, with a column
        # of ones for a bias) and the per-example output gradients of every call that reached
        # the loss; a call that did not (an evaluation with gradients enabled) stays out of A.
        a, delta = record.gradients().kronecker_factors()
        a, delta = a.to(module.weight.dtype), delta.to(module.weight.dtype)  # autocast: back
        A_batch, G_batch = kfac_factors(a, delta)
        n, positions = a.shape[0], math.prod(a.shape[1:-1])
        if self.group is not None:  # the factors of the global batch: means over its examples
            A_batch, G_batch = _mean_over_ranks(
                [A_batch, G_batch], [n * positions, n], self.group
            )
        _check_finite(A_batch, "input factor A", name, step)
        _check_finite(G_batch, "output-gradient factor G", name, step)
        new: dict[str, Tensor | int] = {"step": step + 1}
        if step == 0:
            new["A"], new["G"] = A_batch, G_batch
        else:
            new["A"] = torch.lerp(A_batch, state["A"], decay)  # β A + (1 - β) A_batch
            new["G"] = torch.lerp(G_batch, state["G"], decay)
        if step % group["update_freq"] == 0:
            basis = kronecker_eigenbasis(new["A"], new["G"])
            new.update(zip(_BASIS_KEYS, basis))
        else:
            basis = KroneckerEigenbasis(*(state[key] for key in _BASIS_KEYS))
        if self.mode == "kfac":
            scalings = kfac_scalings(basis)  # (d_out, d_in + 1)
        else:
            scalings_batch = ekfac_scalings(a, delta, basis)  # (d_out, d_in + 1)
            if self.group is not None:
                (scalings_batch,) = _mean_over_ranks([scalings_batch], [n], self.group)
            _check_finite(scalings_batch, "EKFAC scalings", name, step)
            if step % group["update_freq"] == 0:
                scalings = scalings_batch
            else:
                scalings = torch.lerp(scalings_batch, state["scalings"], decay)
            new["scalings"] = scalings
        bias_grad = None
        if has_bias:
            bias_grad = module.bias.grad
            bias_grad = torch.zeros_like(module.bias) if bias_grad is None else bias_grad
        grad = join_weight_bias(module.weight.grad.flatten(1), bias_grad)  # (d_out, d_in + 1)
        preconditioned = precondition(grad, basis, scalings, group["damping"])
        _check_finite(preconditioned, "preconditioned gradient", name, step)
        return module, new, preconditioned


_BASIS_KEYS = KroneckerEigenbasis._fields


def _mean_over_ranks(means: list[Tensor], counts: list[int], group: object) -> list[Tensor]:
    """Means over each rank's examples -> means over all ranks' examples, one all-reduce.

    Each mean is weighted by the number of terms it averages on its rank, so that unequal
    shares give the mean of the concatenated batch.
    """
    import torch.distributed as dist

    like = means[0]
    weights = torch.tensor(counts, dtype=like.dtype, device=like.device)
    flat = torch.cat([*(m.reshape(-1) * c for m, c in zip(means, counts)), weights])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    totals = flat[-len(counts) :]
    sizes = [m.numel() for m in means]
    pieces = torch.split(flat[: -len(counts)], sizes)
    return [p.reshape(m.shape) / t for p, m, t in zip(pieces, means, totals)]


def _is_kronecker_layer(module: nn.Module) -> bool:
    """A Linear, or a convolution of one group: a layer whose Fisher block KFAC factors."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


def _has_trainable_bias(module: nn.Linear) -> bool:
    """A frozen bias is left out of the joint matrix (no ones column): it is not optimized."""
    return module.bias is not None and module.bias.requires_grad


class KFAC(EKFAC):
    r"""KFAC: :class:`EKFAC` with ``mode="kfac"``.

    Each layer's gradient is preconditioned by :math:`(G \otimes A + \lambda I)^{-1}` (exact
    Tikhonov damping of the Kronecker product, computed in its eigenbasis).

    Args:
        model: As for :class:`EKFAC`.
        lr: Learning rate :math:`\eta \ge 0`.
        damping: :math:`\lambda > 0`.
        update_freq: Steps between two eigendecompositions of the factors.
        decay: Weight of the past in the running averages of :math:`A` and :math:`G`.
        loss_reduction: ``"mean"`` or ``"sum"``, as for :class:`EKFAC`.
        group: A process group: factors averaged over data-parallel ranks, as for
            :class:`EKFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float = 1e-3,
        update_freq: int = 10,
        decay: float = 0.95,
        loss_reduction: str = "mean",
        group: object = None,
    ) -> None:
        super().__init__(model, lr, damping, update_freq, decay, "kfac", loss_reduction, group)
