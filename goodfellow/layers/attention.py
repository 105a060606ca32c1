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
"""

from __future__ import annotations

from torch import Tensor, nn

from goodfellow.layers.base import register_rule
from goodfellow.layers.fallback import FallbackRule

__all__ = ["MultiheadAttentionRule"]


class MultiheadAttentionRule(FallbackRule):
    """``nn.MultiheadAttention``, ``batch_first`` either way, all parameters incl. ``out_proj``."""

    claims_submodules = True

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


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
