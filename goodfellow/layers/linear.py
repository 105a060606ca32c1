r"""The linear rule: per-example gradients of ``nn.Linear``, the one outer product of the package.

A linear layer :math:`Z = A W^\top + b` applied to example :math:`i` at positions :math:`t`
(one position for plain vectors; the tokens of a sequence, or the output pixels of a
convolution; a layer called several times in one forward has its calls stacked along the same
axis, since example :math:`i`'s gradient adds up over them) has the per-example gradient

.. math::

    \frac{\partial L_i}{\partial W} = \sum_t G_{i,t} A_{i,t}^\top, \qquad
    \frac{\partial L_i}{\partial b} = \sum_t G_{i,t}, \qquad
    G_{i,t} = \frac{\partial L_i}{\partial Z_{i,t}}.

Index letters in this file: ``n`` example, ``t`` and ``s`` position, ``o`` output feature,
``i`` input feature. Everything else in the package that needs a linear layer's per-example
gradient, norm, weighted sum or second moment calls the functions here (the norms at several
positions, Gram or formed, are in :mod:`goodfellow.layers.position_norms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from goodfellow._autocast import without_autocast
from goodfellow._checks import display_name
from goodfellow.layers._linear_checks import (
    _check_factor_arguments,
    _check_laid_out,
    _check_outer_arguments,
    _check_uses,
)
from goodfellow.layers._projections import _projected_discrepancy
from goodfellow.layers.base import (  # noqa: F401  (norm_from_squares: read from here too)
    LayerRule,
    MaterializedGradients,
    norm_from_squares,
    register_rule,
)
from goodfellow.layers.position_norms import positions_sq_norms
from goodfellow.layers.routes import fastest
from goodfellow.reduction import batch_size_factor


@without_autocast
def batched_outer(grad_outputs: Tensor, inputs: Tensor, out: Tensor | None = None) -> Tensor:
    r"""Per-example weight gradients of one linear layer: one batched outer product.

    Index letters: ``n`` example, ``t`` position inside an example (absent for plain vectors),
    ``o`` output feature, ``i`` input feature. The result is
    ``einsum("nto,nti->noi", grad_outputs, inputs)``: for inputs of shape ``(n, d_in)`` it is the
    outer product :math:`G_i A_i^\top`; for inputs with extra dimensions ``(n, ..., d_in)`` the
    layer is applied at every position and an example's gradient sums over its positions.

    Args:
        grad_outputs: Gradient w.r.t. the layer's output, shape ``(n, ..., d_out)``.
        inputs: The layer's input, shape ``(n, ..., d_in)`` with the same middle dimensions.
        out: Optional preallocated ``(n, d_out, d_in)`` tensor to write the result into (not
            differentiable; reuse it across calls to avoid allocating ``n * d_out * d_in`` floats).

    Returns:
        Tensor of shape ``(n, d_out, d_in)``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes do not fit (ranks, batch sizes or middle dimensions differ),
            the dtypes or devices differ, or ``out`` has the wrong shape, dtype or device or
            shares memory with an input.
    """
    _check_outer_arguments(grad_outputs, inputs, out)
    return _batched_outer(grad_outputs, inputs, out)


def _batched_outer(grad_outputs: Tensor, inputs: Tensor, out: Tensor | None = None) -> Tensor:
    """:func:`batched_outer` for arguments already checked where they came in.

    The rules, :func:`goodfellow.goodfellow_backprop` and KFAC call it once per layer and
    batch; their entry points have checked the shapes, dtypes and buffers. For plain vectors
    ``(n, d_in)`` the outer products are written by whichever of two exact kernels is faster
    for the shape on this machine (``_TIMED_OUTER_BYTES``); at several positions by one
    batched matrix product over them.
    """
    n, d_out, d_in = grad_outputs.shape[0], grad_outputs.shape[-1], inputs.shape[-1]
    if grad_outputs.dim() == 2:
        left = grad_outputs.unsqueeze(2)  # (n, o, 1)
        right = inputs.unsqueeze(1)  # (n, 1, i)
        if n * d_out * d_in * grad_outputs.element_size() < _TIMED_OUTER_BYTES:
            return _broadcast_outer(left, right, out)
        kernels = {
            "broadcast product": lambda: _broadcast_outer(left, right, out),
            "bmm": lambda: _bmm(left, right, out),
        }
        device = grad_outputs.device
        key = ("outer product", n, d_out, d_in, grad_outputs.dtype, device, out is None)
        return fastest(key, kernels, device)
    positions = math.prod(inputs.shape[1:-1])  # explicit: -1 is ambiguous when n = 0
    left = grad_outputs.reshape(n, positions, d_out).transpose(1, 2)  # (n, o, t)
    right = inputs.reshape(n, positions, d_in)  # (n, t, i)
    if out is None:
        return torch.bmm(left, right)  # (n, o, i)
    return torch.bmm(left, right, out=out)  # (n, o, i)


_TIMED_OUTER_BYTES = 16 * 2**20
"""Outer products of at least this many bytes time both kernels once per shape
(:func:`goodfellow.layers.routes.fastest`); smaller ones take the broadcast product.

Both write each entry once, as one product, so their numbers are the same bit for bit; their
speed beyond the caches depends on the machine. The broadcast product ``(n, o, 1) * (n, 1, i)``
writes straight into ``out`` at the speed of a fill, and was the faster one on the AMD VMs of
the earlier sessions (``bmm`` with an inner size of 1 about twice as slow). On an Intel Xeon
(twelfth session) a fill and the broadcast product write about 16 GB/s beyond the caches and
``bmm`` about 1.5x faster (512 MiB: 22 against 32 ms), from about 24 MiB per layer up; at
4 MiB the broadcast product is the faster (0.85 against 1.02 ms)."""


def _broadcast_outer(left: Tensor, right: Tensor, out: Tensor | None) -> Tensor:
    """``(n, o, 1) * (n, 1, i)``, into ``out`` where given; einsum would allocate."""
    return torch.mul(left, right) if out is None else torch.mul(left, right, out=out)


def _bmm(left: Tensor, right: Tensor, out: Tensor | None) -> Tensor:
    """``(n, o, 1) @ (n, 1, i)``: the same products by the batched matrix kernel."""
    return torch.bmm(left, right) if out is None else torch.bmm(left, right, out=out)


@without_autocast
def outer_sq_norms(grad_outputs: Tensor, inputs: Tensor, bias: bool = False) -> Tensor:
    r"""Squared norms of the per-example gradients of one linear layer, without forming them.

    :math:`\|G_i A_i^\top\|_F^2 = \|G_i\|^2 \|A_i\|^2`: the norm of an outer product
    factorizes, so the cost is :math:`O(n (d_{out} + d_{in}))`, not :math:`O(n d_{out} d_{in})`.
    The bias gradient is :math:`G_i` itself, so with it the sum is
    :math:`\|G_i\|^2 (\|A_i\|^2 + 1)`.

    Args:
        grad_outputs: :math:`G`, shape ``(n, d_out)``.
        inputs: :math:`A`, shape ``(n, d_in)``.
        bias: Include the bias gradient's squared norm.

    Returns:
        Tensor of shape ``(n,)``.
    """
    # vecdot(x, x) is each row's squared norm in one kernel
    grad_sq = torch.linalg.vecdot(grad_outputs, grad_outputs)  # (n,)
    input_sq = torch.linalg.vecdot(inputs, inputs)  # (n,)
    return outer_sq_from_row_norms(grad_sq, input_sq, bias)


def outer_sq_from_row_norms(grad_sq: Tensor, input_sq: Tensor, bias: bool) -> Tensor:
    r""":math:`\|G_i\|^2 \|A_i\|^2`, or :math:`\|G_i\|^2 (\|A_i\|^2 + 1)` with the bias.

    From the rows' squared norms, of any (equal) shape: ``(L, n)`` stacks several layers.
    """
    return grad_sq * (input_sq + 1) if bias else grad_sq * input_sq


class LinearFactors(NamedTuple):
    r"""One linear layer's per-example gradients, kept as their two factors.

    Example ``i``'s gradient is :math:`\partial L_i / \partial W = \sum_t G_{i,t} A_{i,t}^\top`
    and :math:`\partial L_i / \partial b = \sum_t G_{i,t}`, with ``t`` the positions of an input
    with extra dimensions (a single position for plain vectors).

    Attributes:
        inputs: The layer's inputs :math:`A`, shape ``(n, T, d_in)``.
        grad_outputs: :math:`G`, the gradient of example ``i``'s own loss :math:`L_i` w.r.t. the
            layer's outputs, shape ``(n, T, d_out)`` (already multiplied by the batch size for
            a mean-reduced loss: build it with :func:`linear_factors` or
            :func:`goodfellow.mlp_factors`).
        bias: Whether the layer has a bias.
    """

    #: The layer's inputs :math:`A`, shape ``(n, T, d_in)``.
    inputs: Tensor
    #: Each example's own output gradients :math:`G`, shape ``(n, T, d_out)``.
    grad_outputs: Tensor
    #: Whether the layer has a bias.
    bias: bool

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the parameters covered, ``("weight", "bias")`` or ``("weight",)``."""
        return ("weight", "bias") if self.bias else ("weight",)

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.inputs.shape[0]

    def per_example(self, out: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        r"""``[dW, db]``, written into ``out`` where given.

        :math:`\sum_t G_t A_t^\top` of shape ``(n, d_out, d_in)`` and :math:`\sum_t G_t` of
        shape ``(n, d_out)``.
        """
        A, G, has_bias = self
        out = [None, None] if out is None else list(out)
        if A.shape[1] == 1:  # one position: the broadcast product, not a bmm of inner size 1
            A, G = A[:, 0], G[:, 0]  # (n, i), (n, o)
            result = [_batched_outer(G, A, out=out[0])]  # (n, o, i)
            if has_bias:
                result.append(G.clone() if out[1] is None else out[1].copy_(G))  # (n, o)
            return result
        result = [_batched_outer(G, A, out=out[0])]  # (n, o, i)
        if has_bias:
            bias = G.sum(dim=1)  # (n, o)
            result.append(bias if out[1] is None else out[1].copy_(bias))
        return result

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\|^2` over weight and bias, ``(n,)``.

        For one position the factored :func:`outer_sq_norms`; for several the Gram or the
        formed route, whichever costs less (:mod:`goodfellow.layers.position_norms`).
        """
        A, G, has_bias = self
        if A.shape[1] == 1:
            return outer_sq_norms(G[:, 0], A[:, 0], bias=has_bias)  # (n,)
        return positions_sq_norms(A, G, has_bias)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`; one contraction, ``_layer_weighted_sum`` in this module."""
        return _layer_weighted_sum(self, weights)

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`; derived at ``_layer_square_sum`` in this module."""
        return _layer_square_sum(self)

    def sum_discrepancy(self, totals: Sequence[Tensor | None], scale: int) -> list[float]:
        r"""As :func:`goodfellow.layers.base.sum_discrepancy`, along random directions.

        Instead of forming :math:`\sum_i g_i` (a batch-gradient product) it compares
        :math:`v^\top (\cdot) u` of both sides for random ``u``, ``v``:
        :math:`\sum_{n,t} (G_{nt} \cdot v)(A_{nt} \cdot u)` costs :math:`O(nT(d_{in} + d_{out}))`.
        A parameter used elsewhere changes the projection with probability one.
        """
        return _projected_discrepancy(self, totals, scale, groups=1)

    def to(self, dtype: torch.dtype) -> LinearFactors:
        """The same factors in another dtype (autocast's products back in the parameters')."""
        return LinearFactors(self.inputs.to(dtype), self.grad_outputs.to(dtype), self.bias)

    def kronecker_factors(self) -> tuple[Tensor, Tensor]:
        r"""``(a, delta)`` for KFAC.

        The inputs with a column of ones when there is a bias (``(n, T, d_in + 1)``) and the
        per-example output gradients ``(n, T, d_out)``.
        """
        A, G, has_bias = self
        if has_bias:
            A = torch.cat([A, A.new_ones((*A.shape[:-1], 1))], dim=-1)  # (n, T, d_in + 1)
        return A, G


def _as_uses(tensors: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A layer's recorded tensors as a list with one entry per use."""
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _positions(tensors: Tensor | Sequence[Tensor]) -> Tensor:
    """Reshape one use ``(n, ..., d)`` or several uses of a layer into ``(n, T, d)``."""
    uses = _as_uses(tensors)
    n = uses[0].shape[0]
    # views where the layout allows; the sizes are explicit, as -1 is ambiguous when n = 0
    laid_out = [t.reshape(n, math.prod(t.shape[1:-1]), t.shape[-1]) for t in uses]
    if len(laid_out) == 1:
        return laid_out[0]  # (n, T, d), no copy: the statistics only read the factors
    # A layer used several times in one forward: its gradient is the sum over all uses, which is
    # the sum over the positions of all uses laid end to end.
    return torch.cat(laid_out, dim=1)  # (n, T, d)


def linear_factors(
    inputs: Tensor | Sequence[Tensor],
    grad_outputs: Tensor | Sequence[Tensor],
    bias: bool = True,
    loss_reduction: str = "sum",
) -> LinearFactors:
    """The factored per-example gradient of one linear layer, from what hooks record.

    Args:
        inputs: The layer's input, shape ``(n, ..., d_in)``; or a list with one such tensor per
            use of the layer in the forward pass.
        grad_outputs: The gradient of the batch loss w.r.t. the layer's output, shape
            ``(n, ..., d_out)`` with the same middle dimensions (or a list, one per use, in the
            order of ``inputs``).
        bias: Whether the layer has a bias.
        loss_reduction: How the batch loss was reduced: ``"sum"`` or ``"mean"`` (then
            ``grad_outputs`` is multiplied by ``n``, as in :func:`goodfellow.goodfellow_backprop`).
            Pass ``"sum"`` for gradients already scaled to example ``i``'s own loss.

    Returns:
        A :class:`LinearFactors` with tensors of shape ``(n, T, d_in)`` and ``(n, T, d_out)``:
        views of ``inputs`` and ``grad_outputs`` for a single use (no copy; ``grad_outputs``
        is copied once, scaled, for ``"mean"``).

    Raises:
        TypeError: If the inputs are not floating-point tensors.
        ValueError: If the shapes, batch sizes, dtypes or numbers of uses do not fit together.
    """
    _check_factor_arguments(inputs, grad_outputs)
    _check_uses(_as_uses(inputs), "inputs")
    _check_uses(_as_uses(grad_outputs), "grad_outputs")
    A = _positions(inputs)  # (n, T, d_in)
    G = _positions(grad_outputs)  # (n, T, d_out)
    _check_laid_out(A, G)
    scale = batch_size_factor(loss_reduction, A.shape[0])
    return LinearFactors(A, G * scale if scale != 1 else G, bool(bias))


def _layer_weighted_sum(
    layer: LinearFactors, weights: Tensor, scaled_inputs: Tensor | None = None
) -> list[Tensor]:
    r""":math:`\sum_i w_i g_i` for one layer: one contraction ``einsum("n,nto,nti->oi")``.

    :math:`w_i` scales the narrower factor, :math:`(w G)^\top A = G^\top (w A)`: for a
    128 -> 512 layer a quarter of the multiplications (and of the memory written).
    ``scaled_inputs``: :math:`w A`, already formed for several layers that read the same input
    (:func:`goodfellow.layers.shared_inputs.weighted_sums`).
    """
    A, G, has_bias = layer
    d_in, d_out = A.shape[2], G.shape[2]
    w = weights[:, None, None]  # (n, 1, 1)
    scales_inputs = scaled_inputs is not None or d_in < d_out
    if scales_inputs and scaled_inputs is None:
        scaled_inputs = A * w  # (n, t, i)
    scaled_A, scaled_G = (scaled_inputs, G) if scales_inputs else (A, G * w)  # G * w: (n, t, o)
    weight_grad = scaled_G.reshape(-1, d_out).T @ scaled_A.reshape(-1, d_in)  # (o, i)
    if not has_bias:
        return [weight_grad]
    return [weight_grad, weights @ G.sum(dim=1) if scales_inputs else scaled_G.sum(dim=(0, 1))]


def _layer_square_sum(layer: LinearFactors) -> list[Tensor]:
    r"""Entrywise :math:`\sum_i g_i^2` of one layer.

    For one position :math:`(G_{io} A_{ii'})^2 = G_{io}^2 A_{ii'}^2`, so the sum is
    ``einsum("no,ni->oi", G**2, A**2)``, a single matrix product (the trick of Balles, Romero &
    Hennig's reference code). With several positions the square of a sum over ``t`` does not
    factor, and the per-example gradients are formed.
    """
    A, G, has_bias = layer
    if A.shape[1] == 1:
        weight = G[:, 0].square().T @ A[:, 0].square()  # (o, i)
    else:
        weight = _batched_outer(G, A).square().sum(dim=0)  # (n, o, i) -> (o, i)
    return [weight, G.sum(dim=1).square().sum(dim=0)] if has_bias else [weight]  # (o,)


class LinearRule(LayerRule):
    """``nn.Linear``: one outer product per example and position."""

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse Linear subclasses whose computation is not ``a @ W.T + b``."""
        own = dict(module.named_parameters(recurse=False))
        extra = sorted(set(own) - {"weight", "bias"})
        if type(module).forward is not nn.Linear.forward or extra:
            why = f"extra parameters {extra}" if extra else "its own forward"
            raise ValueError(
                f"module {display_name(name)} ({type(module).__name__}) subclasses nn.Linear "
                f"with {why}; PerExampleGradients handles only the plain a @ W.T + b of "
                "nn.Linear."
            )

    def gradients(
        self, module: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor]
    ) -> LinearFactors | MaterializedGradients:
        """The layer's :class:`LinearFactors` (its calls laid end to end as positions)."""
        weight = module.weight
        if len({g.dtype for g in grad_outputs}) > 1:  # calls inside and outside autocast
            grad_outputs = [g.to(weight.dtype) for g in grad_outputs]
        # Under autocast the layer computed in g's dtype from its input rounded to it: round the
        # input the same way, as the layer's own backward does.
        inputs = [a if a.dtype == g.dtype else a.to(g.dtype) for a, g in zip(inputs, grad_outputs)]
        A = _positions(inputs)  # (n, T, d_in)
        G = _positions(grad_outputs)  # (n, T, d_out)
        has_bias = module.bias is not None and module.bias.requires_grad
        if not weight.requires_grad:  # a frozen weight with a trained bias: only sum_t G_t
            return MaterializedGradients([G.sum(dim=1)], ("bias",))  # (n, o)
        return LinearFactors(A, G, has_bias)


register_rule(nn.Linear, LinearRule())
