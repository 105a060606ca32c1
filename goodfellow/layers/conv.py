r"""The convolution rule: a convolution is a linear layer at every output position, per group.

For one example, ``nn.ConvNd`` with ``G`` groups computes, at every output position ``t``,

.. math::

    Z_{t, g} = W_g\, \operatorname{patch}_t(x)_g + b_g,

where :math:`\operatorname{patch}_t(x)_g` is the receptive field of position ``t`` over the input
channels of group ``g``, flattened to a vector of length :math:`C_{in}/G \cdot K` (``K`` the
kernel's number of taps), and :math:`W_g` is the group's block of the weight reshaped to
``(C_out/G, C_in/G * K)``. So each group *is* a linear layer applied at :math:`L` positions
(the output pixels) to the unfolded input, and its per-example gradient is the linear rule's
:math:`\sum_t G_{t,g} A_{t,g}^\top` (:mod:`goodfellow.layers.linear`). This file only unfolds:

* the input is padded exactly as the module pads it (``F.pad`` with its ``padding_mode``:
  zeros, reflect, replicate or circular; ``"same"`` included), then cut into patches with
  ``Tensor.unfold`` along each spatial dimension (stride), every ``dilation``-th tap kept;
* the groups become extra rows of the batch, ``(n, L, G, d) -> (n G, L, d)``, so one batched
  product serves depthwise and grouped convolutions alike, and the ``G - 1`` off-diagonal blocks
  of a dense ``C_out x C_in K`` product are never formed.

Treating a reflect or circular padding as zeros, as some per-example libraries do, gives wrong
gradients for every patch that touches the border; :doc:`/tutorials/09_convolutions` shows the
size of that error.

Index letters: ``n`` example, ``g`` group, ``t`` output position, ``o`` output channel of a
group, ``i`` input channel of a group times kernel tap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from goodfellow._checks import display_name
from goodfellow.layers.base import LayerRule, MaterializedGradients, register_rule
from goodfellow.layers.linear import LinearFactors, _compare_projections, _random_directions

__all__ = ["ConvFactors", "ConvRule", "unfold_patches"]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}  # fmt: skip


def unfold_patches(inputs: Tensor, module: nn.modules.conv._ConvNd) -> Tensor:
    """Every receptive field of the convolution, as rows: the input of its linear layer.

    Args:
        inputs: The convolution's input, shape ``(n, C_in, *spatial)``.
        module: The ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` it was given to.

    Returns:
        Tensor of shape ``(n, L, C_in * K)``: ``L`` output positions in row-major order, and
        for each the input channels times kernel taps in the order of
        ``module.weight.flatten(1)`` (a transposed view of a contiguous ``(n, C_in K, L)``).
    """
    d = len(module.kernel_size)
    padding = module._reversed_padding_repeated_twice
    if any(padding):
        inputs = F.pad(inputs, padding, mode=_PAD_MODES[module.padding_mode])
    patches = inputs  # (n, C, *padded)
    for axis, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        span = dil * (k - 1) + 1
        patches = patches.unfold(2 + axis, span, s)[..., ::dil]  # (..., L_axis, ..., k)
    n, c = patches.shape[:2]
    # (n, C, L_1..L_d, k_1..k_d) -> (n, C, k_1..k_d, L_1..L_d) -> (n, C K, L): the copy reads
    # the input along its last (contiguous) axis, several times faster than an (n, L, C K)
    # copy; the result is the transposed view of it, so no second copy is made.
    order = [0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)]
    positions = math.prod(patches.shape[2 : 2 + d])
    flat = patches.permute(order).reshape(n, c * math.prod(module.kernel_size), positions)
    return flat.transpose(1, 2)  # (n, L, C K), a view


class ConvFactors:
    r"""One convolution's per-example gradients, kept as its inputs and output gradients.

    The linear factors of its groups (unfolded patches and output gradients, ``n * G`` rows)
    are formed when a statistic needs them (per-example gradients, norms, KFAC); the weighted
    sum :math:`\sum_i w_i g_i` needs no patches at all: it is the convolution's own weight
    gradient for the output gradients scaled by ``w``.

    Args:
        calls: ``(input, grad_output)`` per call: ``(n, C_in, *spatial)`` and each example's
            own output gradients ``(n, C_out, *out_spatial)``.
        module: The convolution (its hyper-parameters; its weight's shape).
        bias: Whether the bias is trained.
    """

    def __init__(self, calls: list[tuple[Tensor, Tensor]], module: nn.Module, bias: bool) -> None:
        self.calls = calls
        self.module = module
        self.bias = bias
        self.groups = module.groups
        self.weight_shape = tuple(module.weight.shape)
        self._linear: LinearFactors | None = None

    @property
    def linear(self) -> LinearFactors:
        """:class:`goodfellow.LinearFactors` over ``n * G`` rows, built once, as views.

        Inputs ``(n G, L, C_in/G * K)`` (unfolded patches), output gradients
        ``(n G, L, C_out/G)``; several calls laid end to end as positions.
        """
        if self._linear is None:
            g, patches, deltas = self.groups, [], []
            for x, delta in self.calls:
                n = x.shape[0]
                flat = unfold_patches(x, self.module).transpose(1, 2)  # (n, C_in K, L)
                positions = flat.shape[2]
                i, o = flat.shape[1] // g, self.weight_shape[0] // g  # explicit: n may be 0
                patches.append(flat.reshape(n * g, i, positions).transpose(1, 2))  # (n g, L, i)
                grad = delta.reshape(n * g, o, positions)  # (n g, o, L), a view
                deltas.append(grad.transpose(1, 2))  # (n g, L, o)
            A = patches[0] if len(patches) == 1 else torch.cat(patches, dim=1)
            G = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
            self._linear = LinearFactors(A, G, self.bias)
        return self._linear

    @property
    def names(self) -> tuple[str, ...]:
        """``("weight", "bias")`` or ``("weight",)``."""
        return ("weight", "bias") if self.bias else ("weight",)

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.calls[0][0].shape[0]

    def per_example(self, out: list[Tensor | None] | None = None) -> list[Tensor]:
        """``[dW (n, *weight_shape), db (n, C_out)]``, written into ``out`` where given."""
        n, g = self.batch_size, self.groups
        c_out = self.weight_shape[0]
        views = None
        if out is not None:  # contiguous (n, C_out, ...) buffers are (n G, C_out/G, ...) views
            views = [None if b is None else b.view(n * g, c_out // g, -1) for b in out]
            if len(views) > 1 and views[1] is not None:
                views[1] = views[1].view(n * g, c_out // g)
        weight, *bias = self.linear.per_example(views)  # (n G, o, i), (n G, o)
        result = [weight.reshape(n, *self.weight_shape)]
        if bias:
            result.append(bias[0].reshape(n, c_out))
        return result

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\|^2`: the groups' linear norms added, ``(n,)``."""
        return self.linear.sq_norms().reshape(self.batch_size, self.groups).sum(dim=1)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`: the convolution's weight gradient for :math:`w_i G_i`.

        Scaling example ``i``'s output gradient by :math:`w_i` and running the layer's own
        weight-gradient kernel (``aten.convolution_backward``) on the padded input gives
        :math:`\sum_i w_i \sum_t G_{i,t} A_{i,t}^\top` for every group at once, at the cost
        of one ordinary backward of the layer, without unfolding.
        """
        module = self.module
        d = len(module.kernel_size)
        weight = torch.zeros(self.weight_shape, dtype=weights.dtype, device=weights.device)
        bias = weight.new_zeros(self.weight_shape[0])
        for x, delta in self.calls:
            scaled = delta * weights.reshape(-1, *[1] * (delta.dim() - 1))  # w_i G_i
            padding = module._reversed_padding_repeated_twice
            padded = F.pad(x, padding, mode=_PAD_MODES[module.padding_mode]) if any(padding) else x
            weight += torch.ops.aten.convolution_backward(
                scaled, padded, weight, None, module.stride, [0] * d, module.dilation,
                False, [0] * d, module.groups, [False, True, False],
            )[1]  # fmt: skip
            bias += scaled.flatten(2).sum(dim=(0, 2))  # (C_out,)
        return [weight, bias] if self.bias else [weight]

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`, from the per-example gradients.

        The square of a sum over positions does not factor, so the layer's per-example
        gradients are formed (one layer at a time).
        """
        return [t.square().sum(dim=0) for t in self.per_example()]

    def sum_discrepancy(self, totals: list[Tensor | None], scale: int) -> list[float]:
        """As :meth:`goodfellow.LinearFactors.sum_discrepancy`, the groups sharing directions.

        The projection of the patches :math:`A u` is a convolution of the input with ``u``
        as its kernel: no unfolding.
        """
        module, g = self.module, self.groups
        c_in_group = self.weight_shape[1]
        like = self.calls[0][1]
        u, v = _random_directions(
            c_in_group * math.prod(module.kernel_size), self.weight_shape[0] // g, like
        )
        d = len(module.kernel_size)
        kernel = u.reshape(1, c_in_group, *module.kernel_size).repeat(g, *[1] * (1 + d))
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        gv, au = [], []
        for x, delta in self.calls:
            padding = module._reversed_padding_repeated_twice
            padded = F.pad(x, padding, mode=_PAD_MODES[module.padding_mode]) if any(padding) else x
            n = x.shape[0]
            au.append(conv(padded, kernel, None, module.stride, 0, module.dilation, g).reshape(
                n, g, -1))  # fmt: skip
            gv.append(torch.einsum("ngot,o->ngt", delta.reshape(n, g, v.shape[0], -1), v))
        return _compare_projections(
            torch.cat(gv, dim=2), torch.cat(au, dim=2), u, v, totals, scale, g
        )

    def to(self, dtype: torch.dtype) -> ConvFactors:
        """The same factors in another dtype."""
        calls = [(x.to(dtype), delta.to(dtype)) for x, delta in self.calls]
        return ConvFactors(calls, self.module, self.bias)

    def kronecker_factors(self) -> tuple[Tensor, Tensor] | None:
        """``(a, delta)`` of the unfolded layer for KFC (Grosse & Martens 2016).

        Shapes ``(n, L, C_in K [+ 1])`` and ``(n, L, C_out)``; ``None`` for a grouped
        convolution, whose curvature is block diagonal over groups, not one Kronecker product.
        """
        return self.linear.kronecker_factors() if self.groups == 1 else None


class ConvRule(LayerRule):
    """``nn.Conv1d/2d/3d``: the linear rule on unfolded patches, one block per group."""

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse the settings the unfolding does not reproduce (none in torch 2.x's convs)."""
        base = next(c for c in type(module).__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if type(module).forward is not base.forward:
            raise ValueError(
                f"module {display_name(name)} ({type(module).__name__}) subclasses "
                f"{base.__name__} with its own forward; the convolution rule handles only the "
                f"plain {base.__name__}."
            )
        if module.padding_mode not in _PAD_MODES:
            raise ValueError(
                f"module {display_name(name)} has padding_mode {module.padding_mode!r}; "
                f"supported are {sorted(_PAD_MODES)}."
            )

    def min_input_dim(self, module: nn.Module) -> int:
        """``(n, C_in, *spatial)``: an unbatched input has one dimension fewer."""
        return len(module.kernel_size) + 2

    def gradients(
        self, module: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor]
    ) -> ConvFactors | MaterializedGradients:
        """Keep each call's input and output gradients; the groups' linear factors follow."""
        weight = module.weight
        if len({d.dtype for d in grad_outputs}) > 1:  # calls inside and outside autocast
            grad_outputs = [d.to(weight.dtype) for d in grad_outputs]
        has_bias = module.bias is not None and module.bias.requires_grad
        if not weight.requires_grad:  # a frozen weight with a trained bias: only sum_t G_t
            bias = sum(delta.flatten(2).sum(dim=2) for delta in grad_outputs)  # (n, C_out)
            return MaterializedGradients([bias], ("bias",))
        return ConvFactors(
            [(x.to(delta.dtype), delta) for x, delta in zip(inputs, grad_outputs)],
            module,
            has_bias,
        )


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv, ConvRule())
