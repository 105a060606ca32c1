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

:class:`goodfellow.EKFAC` (and :class:`goodfellow.KFAC`, in :mod:`goodfellow.ekfac`) is a
``torch.optim`` optimizer built on these functions: it records :math:`\bar a` and
:math:`\delta` through :class:`goodfellow.PerExampleGradients`, keeps running averages of
:math:`A`, :math:`G` and :math:`S^*`, and refreshes the eigenbasis every ``update_freq`` steps.

Inputs with extra dimensions ``(n, ..., d_in)`` (a layer applied at several positions) use
KFAC-expand (Eschenhagen et al. 2023, arXiv:2311.00636): every position counts as an example of
``A`` and the positions of one example add up in ``G``; :math:`S^*` stays the exact second moment
of the per-example gradients :math:`g_n = \sum_t \delta_{n,t} \bar a_{n,t}^\top`. A Linear called
several times in one forward is treated the same way, its calls stacked as positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from goodfellow._autocast import without_autocast
from goodfellow._kronecker_checks import (
    _check_basis,
    _check_batch,
    _check_damping,
    _check_factors,
    _check_like_basis,
)
from goodfellow.layers.linear import _batched_outer

__all__ = [
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


@without_autocast
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


@without_autocast
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
    _check_factors(A, G)
    input_eigenvalues, input_eigenvectors = torch.linalg.eigh(A)  # (d_in + 1,), (d_in + 1,)*2
    output_eigenvalues, output_eigenvectors = torch.linalg.eigh(G)  # (d_out,), (d_out, d_out)
    return KroneckerEigenbasis(
        input_eigenvalues=input_eigenvalues.clamp(min=0),
        input_eigenvectors=input_eigenvectors,
        output_eigenvalues=output_eigenvalues.clamp(min=0),
        output_eigenvectors=output_eigenvectors,
    )


@without_autocast
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
    rotated_grads = _batched_outer(delta_rotated, a_rotated)  # (n, d_out, d_in + 1)
    return rotated_grads.square().mean(0)  # (d_out, d_in + 1)


@without_autocast
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


@without_autocast
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


@without_autocast
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
