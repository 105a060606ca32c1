r"""``nn.MultiheadAttention``: the fallback rule with the batch on the right dimension.

``nn.MultiheadAttention`` computes its output projection with
``F.linear(attn, self.out_proj.weight, self.out_proj.bias)`` inside
``F.multi_head_attention_forward``, never calling ``out_proj``'s own ``forward``: hooks on
``out_proj`` see nothing, and a recorder that trusted them would report zero gradients. So this
rule claims every parameter of the module, ``out_proj``'s included, and the recorder does not
record ``out_proj`` on its own. The gradients are those of :mod:`goodfellow.layers.fallback`:
``vmap`` over the examples of ``grad`` of :math:`\langle \mathrm{MHA}(q_i, k_i, v_i), G_i\rangle`.

With ``batch_first=False`` query, key and value are ``(L, n, E)``: the examples are on
dimension 1, and so they are in the output and its gradient. ``key_padding_mask`` is
``(n, S)`` either way; ``attn_mask`` of shape ``(L, S)`` is shared by all examples, while a 3-d
``attn_mask`` of shape ``(n * num_heads, L, S)`` mixes the batch with the heads and is refused.
The attention weights (the second output) must not reach the loss: their gradient would have no
place in the recorded vector-Jacobian product, and the recorder refuses such a backward.

The factored route. When the module has none of the extras below, every projection is a
linear layer and the rule hands its blocks to the linear rule as
:class:`goodfellow.LinearFactors`: ``(a, G)`` for ``out_proj``, with :math:`a` the attention
output before it, ``(x_q, dq)``, ``(x_k, dk)``, ``(x_v, dv)`` for the blocks of
``in_proj_weight`` (one ``(x, [dq dk dv])`` when query, key and value are the same tensor,
``(x_q, dq)`` and ``(x_k, [dk dv])`` when only key and value are).
Norms, clipped sums and second moments then come from the linear rule, with nothing ``n * P``
formed. Where the pairs come from:

* captured (:mod:`goodfellow.layers.attention_capture`): while the recorder is attached the
  module's functional forward runs as written there, the same operations in the same order,
  and the recorder hooks the projections' outputs, so :math:`a`, :math:`dq, dk, dv` are those
  of the forward that ran and nothing is recomputed;
* recomputed, for the calls the capture leaves to torch's own function: the rule computes
  :math:`q = x_q W_q^\top + b_q` (and ``k``, ``v``) and the core
  :math:`a = \operatorname{softmax}(q k^\top / \sqrt{d_h} + M) v` (heads merged) again on the
  whole batch and runs one backward of the core from :math:`\partial L/\partial a = G W_o`
  (the core never mixes examples).

The extras that send a module to the ``vmap`` route instead: ``add_bias_kv``,
``add_zero_attn`` and a frozen part of a projection; and a backward with
``create_graph=True``, whose results must stay differentiable while the captured pairs carry
no graph (a gradient penalty through attention needs ``need_weights=True``: torch's fused
attention kernel, used otherwise, has no second derivative). Dropout in training mode is
refused on either route: its masks, drawn in the forward, cannot be drawn again.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from goodfellow.layers.attention_capture import SEPARATE_WEIGHTS, AttentionCapture, float_mask
from goodfellow.layers.base import MaterializedGradients, register_rule, sum_discrepancy
from goodfellow.layers.fallback import FallbackRule
from goodfellow.layers.linear import LinearFactors, _layer_square_sum

__all__ = ["AttentionGradients", "MultiheadAttentionRule"]

_FORWARD_ARGS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


class AttentionGradients:
    """An attention module's per-example gradients as linear blocks, stacked per parameter.

    Args:
        blocks: ``(factors, weight name, bias name or None)`` per block; the blocks of one
            parameter are consecutive and their rows stack in that order
            (``in_proj_weight`` = the query, key and value blocks).
        names: Every parameter covered, in the module's order.
    """

    def __init__(self, blocks: list[tuple[LinearFactors, str, str | None]], names: Sequence[str]):
        self.blocks = blocks
        self.names = tuple(names)

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.blocks[0][0].batch_size

    @property
    def _dtype(self) -> torch.dtype:
        return self.blocks[0][0].inputs.dtype

    def _stacked(self, parts: list[list[Tensor]], out: Sequence[Tensor | None] | None) -> list:
        """One result per name: the blocks' ``[weight, bias]`` parts concatenated along rows."""
        rows: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for (_, weight, bias), (w, *b) in zip(self.blocks, parts):
            rows[weight].append(w)
            if bias is not None:
                rows[bias].append(b[0])
        out = [None] * len(self.names) if out is None else list(out)
        dim = 1 if parts and parts[0][0].dim() == 3 else 0  # (n, rows, ...) or (rows, ...)
        return [torch.cat(rows[name], dim=dim) if buffer is None else
                torch.cat(rows[name], dim=dim, out=buffer)
                for name, buffer in zip(self.names, out)]  # fmt: skip

    def per_example(self, out: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """One ``(n, *param.shape)`` tensor per name (into ``out`` where given).

        Where every parameter is one block (self-attention with the packed weight), each block
        writes into its buffers directly, without a copy through ``cat``.
        """
        parts = [name for _, weight, bias in self.blocks for name in (weight, bias) if name]
        if len(set(parts)) < len(parts):  # a parameter in several blocks: stack their rows
            return self._stacked([factors.per_example() for factors, _, _ in self.blocks], out)
        buffers = dict(zip(self.names, [None] * len(self.names) if out is None else out))
        results = {}
        for factors, weight, bias in self.blocks:
            tensors = factors.per_example(out=[buffers[weight], buffers.get(bias)])
            results.update(zip([weight, bias], tensors))  # bias: None where there is none
        return [results[name] for name in self.names]

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\|^2`: the blocks' linear norms added, ``(n,)``."""
        return sum(factors.sq_norms() for factors, _, _ in self.blocks)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`, block by block."""
        return self._stacked([f.weighted_sum(weights) for f, _, _ in self.blocks], None)

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`, block by block."""
        return self._stacked([_layer_square_sum(f) for f, _, _ in self.blocks], None)

    def sum_discrepancy(self, totals: Sequence[Tensor | None], scale: int) -> list[float]:
        """As :func:`goodfellow.layers.base.sum_discrepancy`, in the totals' dtype (autocast)."""
        dtype = next(t for t in totals if t is not None).dtype
        return sum_discrepancy(self if dtype == self._dtype else self.to(dtype), totals, scale)

    def to(self, dtype: torch.dtype) -> AttentionGradients:
        """The same blocks in another dtype."""
        return AttentionGradients([(f.to(dtype), w, b) for f, w, b in self.blocks], self.names)

    def kronecker_factors(self) -> None:
        """Several blocks per parameter: no single Kronecker product (KFAC takes SGD steps)."""
        return None


class MultiheadAttentionRule(FallbackRule):
    """``nn.MultiheadAttention``, ``batch_first`` either way, all parameters incl. ``out_proj``."""

    claims_submodules = True

    def gradients(  # type: ignore[override]
        self,
        module: nn.Module,
        inputs: list[Tensor],
        grad_outputs: list[Tensor],
        calls: Sequence[tuple[tuple, dict]] | None = None,
        captures: Sequence[AttentionCapture | None] | None = None,
    ) -> AttentionGradients | MaterializedGradients:
        """The factored route where it applies (module docstring), else ``vmap``'s.

        ``captures``: what :meth:`capture` saw inside each call; where every call was
        captured, the blocks come from it and nothing is recomputed.
        """
        names = self.parameter_names(module)
        if module.training and module.dropout > 0:
            raise ValueError(
                f"nn.MultiheadAttention with dropout={module.dropout} in training mode: its "
                "dropout masks were drawn in the forward and cannot be drawn again to recompute "
                "each example's gradient. Train it with dropout=0 (or record in eval mode)."
            )
        # results that must stay differentiable (create_graph=True) take vmap's route: the
        # factored one reads projections captured (or recomputed) without their graph
        differentiable = any(g.requires_grad for g in grad_outputs)
        if calls is None or not _factorable(module, names) or differentiable:
            return super().gradients(module, inputs, grad_outputs, calls)
        if captures and all(c is not None and c.complete for c in captures):
            per_call = [_captured_blocks(module, c, g) for c, g in zip(captures, grad_outputs)]
        else:
            per_call = [self._blocks(module, args, kwargs, g)
                        for (args, kwargs), g in zip(calls, grad_outputs)]  # fmt: skip
        layouts = {tuple((w, b) for _, w, b in blocks) for blocks in per_call}
        if len(layouts) > 1:  # calls of different kinds (self- and cross-attention)
            return super().gradients(module, inputs, grad_outputs, calls)
        blocks = [
            (_positions_end_to_end([c[j][0] for c in per_call]), w, b)
            for j, (_, w, b) in enumerate(per_call[0])
        ]  # calls laid end to end as positions, block by block
        return AttentionGradients(blocks, names)

    def capture(self, module: nn.Module) -> AttentionCapture | None:
        """An :class:`~goodfellow.layers.attention_capture.AttentionCapture` per call.

        Only for a module the factored route covers: for the others it would capture nothing.
        """
        return AttentionCapture() if _factorable(module, self.parameter_names(module)) else None

    def _blocks(
        self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, grad_output: Tensor
    ) -> list[tuple[LinearFactors, str, str | None]]:
        """One call's linear blocks: ``out_proj`` from ``(a, G)``, the projections from the core."""
        bound = dict(zip(_FORWARD_ARGS, args)) | kwargs
        query, key, value = bound["query"], bound["key"], bound["value"]
        same = query is key and key is value  # self-attention: one input for the three
        if bound.get("attn_mask") is not None:
            self.in_dim(module, "attn_mask", bound["attn_mask"], 0)  # refuses a 3-d mask
        # in the output gradient's dtype: under autocast the forward computed in it
        dtype = grad_output.dtype
        query, key, value, G = (t.detach().to(dtype) for t in (query, key, value, grad_output))
        if not module.batch_first:  # (L, n, E) -> (n, L, E)
            query, key, value, G = (t.transpose(0, 1) for t in (query, key, value, G))
        h = module.num_heads
        b_in = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(dtype)
        bias = None if module.in_proj_bias is None else "in_proj_bias"
        out_bias = None if module.out_proj.bias is None else "out_proj.bias"
        has_bias = bias is not None
        packed = module._qkv_same_embed_dim and same  # one block: A A^T is formed once
        with torch.enable_grad():
            if packed:  # one product for q, k, v, and their gradients as one (n, L, 3E) tensor
                w_in = module.in_proj_weight.detach().to(dtype)
                qkv = F.linear(query, w_in, b_in).requires_grad_()
                leaves = (qkv,)
                q, k, v = qkv.chunk(3, dim=-1)  # (n, L, E) each
            else:
                (w_q, w_k, w_v), names = _projection_weights(module, dtype)
                b_q, b_k, b_v = (None,) * 3 if b_in is None else b_in.chunk(3)
                q = F.linear(query, w_q, b_q).requires_grad_()  # (n, L, E)
                k = F.linear(key, w_k, b_k).requires_grad_()  # (n, S, E)
                v = F.linear(value, w_v, b_v).requires_grad_()  # (n, S, E)
                leaves = (q, k, v)
            mask = _additive_mask(bound, q, k, module)  # (n, 1, L, S) or None
            a = _core(q, k, v, h, mask)  # (n, L, E): heads merged, before out_proj
            d_a = G @ module.out_proj.weight.detach().to(dtype)  # dL/da = G W_o, (n, L, E)
            grads = torch.autograd.grad(a, leaves, d_a)
        if packed:
            projections = [(LinearFactors(query, grads[0], has_bias), "in_proj_weight", bias)]
        else:
            projections = [
                (LinearFactors(x, d, has_bias), name, bias)
                for x, d, name in zip((query, key, value), grads, names)
            ]
        out_proj = LinearFactors(a.detach(), G, out_bias is not None)
        return [*projections, (out_proj, "out_proj.weight", out_bias)]

    def batch_dim(self, module: nn.Module) -> int:
        """``0`` for ``batch_first=True``, else ``1`` (inputs ``(L, n, E)``)."""
        return 0 if module.batch_first else 1

    def in_dim(self, module: nn.Module, key: str | None, value: object, n: int) -> int | None:
        """Query, key and value on :meth:`batch_dim`, ``key_padding_mask`` on 0, masks shared."""
        if not isinstance(value, Tensor):
            return None
        if key == "attn_mask":
            if value.dim() == 3:
                raise ValueError(
                    "a 3-d attn_mask of shape (n * num_heads, L, S) mixes the examples with the "
                    "heads, so its rows cannot be handed to each example; pass a 2-d (L, S) "
                    "mask shared by all examples, or key_padding_mask of shape (n, S)."
                )
            return None
        if key == "key_padding_mask":
            return 0
        return super().in_dim(module, key, value, n)


def _captured_blocks(
    module: nn.MultiheadAttention, capture: AttentionCapture, grad_output: Tensor
) -> list[tuple[LinearFactors, str, str | None]]:
    """One captured call's linear blocks: each projection's input and output gradient."""
    bias = None if module.in_proj_bias is None else "in_proj_bias"
    out_bias = None if module.out_proj.bias is None else "out_proj.bias"

    def batch_first(t: Tensor) -> Tensor:  # (T, n, d), as the functional sees it -> (n, T, d)
        return t.transpose(0, 1).contiguous()

    # under autocast the projection ran in its gradient's dtype on its input rounded to it
    blocks = [
        (LinearFactors(batch_first(x.to(d.dtype)), batch_first(d), bias is not None), weight, bias)
        for x, d, weight in zip(capture.inputs, capture.grad_outputs, capture.weights)
    ]
    length, n = capture.inputs[0].shape[:2]
    G = grad_output.detach() if module.batch_first else batch_first(grad_output.detach())
    embed = capture.core_output.shape[-1]  # explicit: -1 is ambiguous when n = 0
    core = batch_first(capture.core_output.view(length, n, embed).to(G.dtype))  # (n, L, E)
    out_proj = LinearFactors(core, G, out_bias is not None)
    return [*blocks, (out_proj, "out_proj.weight", out_bias)]


def _factorable(module: nn.MultiheadAttention, names: Sequence[str]) -> bool:
    """Whether the factored route covers this module (no extras, every part trained)."""
    if module.bias_k is not None or module.add_zero_attn:
        return False
    params = dict(module.named_parameters())
    return len(names) == len(params)


def _positions_end_to_end(parts: list[LinearFactors]) -> LinearFactors:
    """Several calls' factors of one block as one, the calls' positions laid end to end."""
    if len(parts) == 1:
        return parts[0]
    inputs = torch.cat([p.inputs for p in parts], dim=1)  # (n, T_1 + T_2 + ..., d_in)
    grads = torch.cat([p.grad_outputs for p in parts], dim=1)  # (n, T_1 + T_2 + ..., d_out)
    return LinearFactors(inputs, grads, parts[0].bias)


def _additive_mask(bound: dict, q: Tensor, k: Tensor, module: nn.Module) -> Tensor | None:
    """``attn_mask``, ``key_padding_mask`` and ``is_causal`` as one float mask added to scores."""
    n, length, source = q.shape[0], q.shape[1], k.shape[1]
    attn_mask, padding = bound.get("attn_mask"), bound.get("key_padding_mask")
    if attn_mask is None and bound.get("is_causal", False):
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
    mask = None
    for part, shape in ((attn_mask, (1, 1, length, source)), (padding, (n, 1, 1, source))):
        if part is None:
            continue
        part = float_mask(part, q.dtype).to(q.dtype).reshape(shape)
        mask = part if mask is None else mask + part
    return mask


def _projection_weights(
    module: nn.MultiheadAttention, dtype: torch.dtype
) -> tuple[list[Tensor], list[str]]:
    """The query, key and value weights (detached, in ``dtype``) and their parameters."""
    if module._qkv_same_embed_dim:
        return list(module.in_proj_weight.detach().to(dtype).chunk(3)), ["in_proj_weight"] * 3
    weights = [getattr(module, name) for name in SEPARATE_WEIGHTS]
    return [w.detach().to(dtype) for w in weights], list(SEPARATE_WEIGHTS)


def _core(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """``softmax(q k^T / sqrt(d_h) + mask) v`` per head, heads merged back: ``(n, L, E)``.

    Through ``F.scaled_dot_product_attention``, as the module's own forward: a query row whose
    keys are all masked gets zeros there, not NaN.
    """
    n, length, e = q.shape
    d_h = e // heads

    def split(z: Tensor) -> Tensor:
        return z.reshape(n, z.shape[1], heads, d_h).transpose(1, 2)  # (n, h, T, d_h)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(n, length, e)  # (n, h, L, d_h) -> (n, L, E)


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
