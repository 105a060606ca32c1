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
from goodfellow.layers._projections import _compare_projections, _random_directions
from goodfellow.layers.base import LayerRule, MaterializedGradients, register_rule
from goodfellow.layers.linear import LinearFactors
from goodfellow.layers.position_norms import gram_count, sum_of_squares
from goodfellow.layers.routes import fastest

__all__ = ["ConvFactors", "ConvRule", "pad_like", "unfold_patches"]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}  # fmt: skip
_CHUNK_BYTES = 8 * 2**20
"""Unfolded patches are formed for this many bytes of examples at a time: a buffer that stays
in cache and is reused, instead of ``K`` copies of the whole input in fresh memory."""
_GROUPED_CHUNK_BYTES = 2 * 2**20
"""The grouped route's other candidate runs the kernel on this many bytes of examples at a time
(their inputs, output gradients and per-example gradients): with every example of a batch as a
group, the kernel's working set outgrows the cores' own caches, and on a 2-core AMD EPYC
(1 MiB of L2 per core) chunks of 8-16 examples ran 1.5-3x faster than the whole batch."""


def pad_like(inputs: Tensor, module: nn.modules.conv._ConvNd) -> Tensor:
    """The input padded exactly as the module pads it (any ``padding_mode``, ``"same"`` too)."""
    padding = module._reversed_padding_repeated_twice
    if not any(padding):
        return inputs
    return F.pad(inputs, padding, mode=_PAD_MODES[module.padding_mode])


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
    patches = pad_like(inputs, module)  # (n, C, *padded)
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

    Nothing is unfolded until a statistic asks. The per-example weight gradient of one call
    has three exact routes, timed once per shape by :func:`goodfellow.layers.routes.fastest`:
    the linear rule on unfolded patches, formed a few examples at a time (``_CHUNK_BYTES``),
    or the layer's own weight-gradient kernel with every example as a group of its own
    (``groups = n G``: example ``i``'s output gradients convolved with example ``i``'s input
    only), run on the whole batch or on a few examples at a time (``_GROUPED_CHUNK_BYTES``).
    The weighted sum :math:`\sum_i w_i g_i` needs neither: it is the convolution's
    ordinary weight gradient for the output gradients scaled by ``w``.

    Memory: the norms take, per layer, whichever of the Gram route and the materialized one
    costs less (as the linear rule does); a layer whose norms were materialized keeps its
    per-example gradients (``n`` times its parameters) for as long as this object lives, so
    that the weighted sum of a clipped mean reuses them instead of a second pass over the input.

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
        self._formed: list[Tensor] | None = None  # per-example gradients sq_norms formed

    def _linear_rows(self, start: int, stop: int) -> LinearFactors:
        """The groups' linear factors of examples ``start:stop``, ``(stop - start) G`` rows.

        Inputs ``(rows, L, C_in/G * K)`` (unfolded patches), output gradients
        ``(rows, L, C_out/G)``; several calls laid end to end as positions.
        """
        g, patches, deltas = self.groups, [], []
        for x, delta in self.calls:
            n = stop - start
            flat = unfold_patches(x[start:stop], self.module).transpose(1, 2)  # (n, C_in K, L)
            positions = flat.shape[2]
            i, o = flat.shape[1] // g, self.weight_shape[0] // g  # explicit: n may be 0
            patches.append(flat.reshape(n * g, i, positions).transpose(1, 2))  # (n g, L, i)
            grad = delta[start:stop].reshape(n * g, o, positions)  # (n g, o, L), a view
            deltas.append(grad.transpose(1, 2))  # (n g, L, o)
        A = patches[0] if len(patches) == 1 else torch.cat(patches, dim=1)
        G = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
        return LinearFactors(A, G, self.bias)

    @property
    def linear(self) -> LinearFactors:
        """:class:`goodfellow.LinearFactors` over all ``n * G`` rows, built once (KFAC's input)."""
        if self._linear is None:
            self._linear = self._linear_rows(0, self.batch_size)
        return self._linear

    def _chunks(self) -> list[tuple[int, int]]:
        """Example ranges whose unfolded patches fill about ``_CHUNK_BYTES``."""
        n = self.batch_size
        per_example = sum(
            math.prod(x.shape[1:]) * math.prod(self.module.kernel_size) * x.element_size()
            for x, _ in self.calls
        )  # at least the patches of every output position (stride 1: about that many)
        step = max(1, _CHUNK_BYTES // max(per_example, 1))
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    @property
    def names(self) -> tuple[str, ...]:
        """``("weight", "bias")`` or ``("weight",)``."""
        return ("weight", "bias") if self.bias else ("weight",)

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.calls[0][0].shape[0]

    def _call_weight(self, x: Tensor, delta: Tensor, out: Tensor | None = None) -> Tensor:
        """One call's per-example weight gradients ``(n, *weight_shape)``, by the faster route."""
        if x.requires_grad or delta.requires_grad:  # a backward with create_graph=True
            return self._differentiable_weight(x, delta)
        module = self.module
        key = ("conv weight", tuple(x.shape), tuple(delta.shape), self.weight_shape,
               module.stride, module.dilation, self.groups, x.dtype, x.device)  # fmt: skip
        routes = {
            "unfold": lambda: self._unfolded_weight(x, delta, out),
            "grouped": lambda: self._grouped_weight(x, delta, out),
            "grouped-chunks": lambda: self._grouped_chunks(x, delta, out),
        }
        return fastest(key, routes, x.device)

    def _differentiable_weight(self, x: Tensor, delta: Tensor) -> Tensor:
        r""":math:`\sum_t G_t A_t^\top` of all examples in one product, into no buffer.

        The timed routes write into buffers (``out=``), which autograd cannot differentiate;
        results that must stay differentiable (a backward with ``create_graph=True``) take this
        one.
        """
        n = x.shape[0]
        A, G, _ = ConvFactors([(x, delta)], self.module, bias=False)._linear_rows(0, n)
        return torch.bmm(G.transpose(1, 2), A).view(n, *self.weight_shape)  # (n g, o, i)

    def _unfolded_weight(self, x: Tensor, delta: Tensor, out: Tensor | None) -> Tensor:
        r""":math:`\sum_t G_t A_t^\top` per example and group, a chunk of examples at a time."""
        n, g = x.shape[0], self.groups
        result = delta.new_empty((n, *self.weight_shape)) if out is None else out
        i = math.prod(self.weight_shape[1:])  # sizes explicit: -1 is ambiguous when n = 0
        rows = result.view(n * g, self.weight_shape[0] // g, i)  # (n g, o, i)
        single = ConvFactors([(x, delta)], self.module, bias=False)
        for start, stop in single._chunks():
            A, G, _ = single._linear_rows(start, stop)  # (c g, L, i), (c g, L, o)
            torch.bmm(G.transpose(1, 2), A, out=rows[start * g : stop * g])  # (c g, o, i)
        return result

    def _grouped_weight(self, x: Tensor, delta: Tensor, out: Tensor | None) -> Tensor:
        """The layer's weight-gradient kernel with the ``n`` examples as ``n G`` groups."""
        module, n = self.module, x.shape[0]
        if n == 0:
            return delta.new_zeros((0, *self.weight_shape)) if out is None else out
        padded = pad_like(x, module)  # (n, C_in, *padded)
        d = len(module.kernel_size)
        c_out = self.weight_shape[0]
        shape_only = delta.new_empty((n * c_out, *self.weight_shape[1:]))  # never read
        weight = torch.ops.aten.convolution_backward(
            delta.reshape(1, n * c_out, *delta.shape[2:]),
            padded.reshape(1, n * padded.shape[1], *padded.shape[2:]),
            shape_only, None, module.stride, [0] * d, module.dilation, False, [0] * d,
            n * self.groups, [False, True, False],
        )[1].view(n, *self.weight_shape)  # fmt: skip
        return weight if out is None else out.copy_(weight)

    def _grouped_chunks(self, x: Tensor, delta: Tensor, out: Tensor | None) -> Tensor:
        """:meth:`_grouped_weight` on about ``_GROUPED_CHUNK_BYTES`` of examples at a time."""
        n = x.shape[0]
        result = delta.new_empty((n, *self.weight_shape)) if out is None else out
        per_example = x[:1].numel() + delta[:1].numel() + math.prod(self.weight_shape)
        step = max(1, _GROUPED_CHUNK_BYTES // (per_example * delta.element_size()))
        for start in range(0, n, step):
            stop = min(start + step, n)
            self._grouped_weight(x[start:stop], delta[start:stop], result[start:stop])
        return result

    def per_example(self, out: list[Tensor | None] | None = None) -> list[Tensor]:
        """``[dW (n, *weight_shape), db (n, C_out)]``, written into ``out`` where given."""
        out = [None, None] if out is None else list(out) + [None]
        (x, delta), *more = self.calls
        weight = self._call_weight(x, delta, out[0])
        for x, delta in more:  # a layer applied again: the calls' gradients add up
            weight.add_(self._call_weight(x, delta))  # into a fresh tensor, or into out[0]
        result = [weight]
        if self.bias:
            bias = sum(delta.flatten(2).sum(dim=2) for _, delta in self.calls)  # (n, C_out)
            result.append(bias if out[1] is None else out[1].copy_(bias))
        return result

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\|^2`, ``(n,)``.

        Where the linear rule would take the Gram route
        (:mod:`goodfellow.layers.position_norms`: few positions for the weight's size), the
        groups' Gram norms, a chunk of examples at a time;
        otherwise the squared entries of the per-example gradients, one layer at a time.
        """
        n, g = self.batch_size, self.groups
        positions = sum(math.prod(delta.shape[2:]) for _, delta in self.calls)
        d_out, d_in = self.weight_shape[0] // g, math.prod(self.weight_shape[1:])
        if gram_count(positions, d_in, d_out) <= positions * d_in * d_out:
            chunks = [self._linear_rows(start, stop).sq_norms() for start, stop in self._chunks()]
            return torch.cat(chunks).reshape(n, g).sum(dim=1)
        self._formed = self.per_example()  # kept: the weighted sum that follows reuses them
        return sum(sum_of_squares(t) for t in self._formed)  # (n,)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`: the convolution's weight gradient for :math:`w_i G_i`.

        Scaling example ``i``'s output gradient by :math:`w_i` and running the layer's own
        weight-gradient kernel (``aten.convolution_backward``) on the padded input gives
        :math:`\sum_i w_i \sum_t G_{i,t} A_{i,t}^\top` for every group at once, at the cost
        of one ordinary backward of the layer, without unfolding. If :meth:`sq_norms` formed
        the per-example gradients (its materialized route), they are reused instead: one
        ``(n,) @ (n, P_layer)`` product, no second pass over the input.
        """
        if self._formed is not None:
            return [torch.tensordot(weights.to(t.dtype), t, dims=1) for t in self._formed]
        module = self.module
        d = len(module.kernel_size)
        weight = torch.zeros(self.weight_shape, dtype=weights.dtype, device=weights.device)
        bias = weight.new_zeros(self.weight_shape[0])
        for x, delta in self.calls:
            scaled = delta * weights.reshape(-1, *[1] * (delta.dim() - 1))  # w_i G_i
            weight += torch.ops.aten.convolution_backward(
                scaled, pad_like(x, module), weight, None, module.stride, [0] * d,
                module.dilation, False, [0] * d, module.groups, [False, True, False],
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
            n = x.shape[0]
            projected = conv(pad_like(x, module), kernel, None, module.stride, 0,
                             module.dilation, g)  # fmt: skip
            au.append(projected.flatten(2))  # (n, g, t)
            # v^T G per group and position, "ngot,o->ngt"; matmul reads G in place, 10x faster
            # than einsum, which copied it into another layout first
            positions = math.prod(delta.shape[2:])  # explicit: -1 is ambiguous when n = 0
            gv.append(torch.matmul(v, delta.reshape(n, g, v.shape[0], positions)))  # (n, g, t)
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
