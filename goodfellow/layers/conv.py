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
from goodfellow.layers.linear import LinearFactors, _projected_discrepancy

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
        ``module.weight.flatten(1)``.
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
    # (n, C, L_1..L_d, k_1..k_d) -> (n, L_1..L_d, C, k_1..k_d) -> (n, L, C * K)
    order = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    positions = math.prod(patches.shape[2 : 2 + d])
    return patches.permute(order).reshape(n, positions, c * math.prod(module.kernel_size))


class ConvFactors:
    r"""One convolution's per-example gradients, kept as the linear factors of its groups.

    Attributes:
        linear: :class:`goodfellow.LinearFactors` over ``n * groups`` rows: inputs
            ``(n G, L, C_in/G * K)`` (unfolded patches), output gradients ``(n G, L, C_out/G)``.
        groups: The number of groups ``G``.
        weight_shape: ``(C_out, C_in/G, *kernel_size)``.
    """

    def __init__(self, linear: LinearFactors, groups: int, weight_shape: torch.Size) -> None:
        self.linear = linear
        self.groups = groups
        self.weight_shape = tuple(weight_shape)

    @property
    def names(self) -> tuple[str, ...]:
        """``("weight", "bias")`` or ``("weight",)``."""
        return self.linear.names

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.linear.inputs.shape[0] // self.groups

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
        r""":math:`\|g_i\\|^2`: the groups' linear norms added, ``(n,)``."""
        return self.linear.sq_norms().reshape(self.batch_size, self.groups).sum(dim=1)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`: ``einsum("n,ngto,ngti->goi")``, one product per group."""
        n, g = self.batch_size, self.groups
        A, G, has_bias = self.linear
        A = A.reshape(n, g, *A.shape[1:])  # (n, g, t, i)
        Gw = G.reshape(n, g, *G.shape[1:]) * weights[:, None, None, None]  # (n, g, t, o)
        # (g, o, n t) @ (g, n t, i): the batch and positions are one contraction axis
        weight = torch.bmm(
            Gw.permute(1, 3, 0, 2).reshape(g, Gw.shape[3], -1),
            A.permute(1, 0, 2, 3).reshape(g, -1, A.shape[3]),
        )  # (g, o, i)
        result = [weight.reshape(self.weight_shape)]
        if has_bias:
            result.append(Gw.sum(dim=(0, 2)).reshape(-1))  # (g o,)
        return result

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`, from the per-example gradients.

        The square of a sum over positions does not factor, so the layer's per-example
        gradients are formed (one layer at a time).
        """
        return [t.square().sum(dim=0) for t in self.per_example()]

    def sum_discrepancy(self, totals: list[Tensor | None], scale: int) -> list[float]:
        """As :meth:`goodfellow.LinearFactors.sum_discrepancy`, the groups sharing directions."""
        return _projected_discrepancy(self.linear, totals, scale, groups=self.groups)

    def to(self, dtype: torch.dtype) -> ConvFactors:
        """The same factors in another dtype."""
        return ConvFactors(self.linear.to(dtype), self.groups, self.weight_shape)

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
        """Unfold each call's input, lay the groups into the batch, and hand over to linear."""
        weight, g = module.weight, module.groups
        if len({d.dtype for d in grad_outputs}) > 1:  # calls inside and outside autocast
            grad_outputs = [d.to(weight.dtype) for d in grad_outputs]
        patches, deltas = [], []
        for x, delta in zip(inputs, grad_outputs):
            A = unfold_patches(x.to(delta.dtype), module)  # (n, L, C_in K)
            n, positions = A.shape[:2]
            A = A.reshape(n, positions, g, -1).transpose(1, 2)  # (n, g, L, i)
            G = delta.flatten(2).transpose(1, 2)  # (n, L, C_out)
            G = G.reshape(n, positions, g, -1).transpose(1, 2)  # (n, g, L, o)
            patches.append(A.reshape(n * g, positions, -1))  # (n g, L, i)
            deltas.append(G.reshape(n * g, positions, -1))  # (n g, L, o)
        A = patches[0] if len(patches) == 1 else torch.cat(patches, dim=1)  # calls as positions
        G = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
        has_bias = module.bias is not None and module.bias.requires_grad
        if not weight.requires_grad:
            bias = G.sum(dim=1).reshape(-1, weight.shape[0])  # (n, C_out)
            return MaterializedGradients([bias], ("bias",))
        return ConvFactors(LinearFactors(A, G, has_bias), g, weight.shape)


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv, ConvRule())
