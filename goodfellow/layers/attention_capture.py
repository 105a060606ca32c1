r"""Recording inside ``nn.MultiheadAttention``: its forward as linear maps around a core.

The module applies its projections with ``F.linear`` inside ``F.multi_head_attention_forward``,
so no submodule hook sees them. What the factored rule (:mod:`goodfellow.layers.attention`)
needs of every projection is the linear rule's pair: its input and the gradient of its output.
Without them it has to recompute the projections and run a backward of the attention core
per batch. With them nothing is recomputed.

So, while the recorder is attached, each call of the module runs inside an
:class:`AttentionCapture`, a ``torch`` function mode (the documented way to see a call of a
``torch`` function from outside). ``F.multi_head_attention_forward`` hands itself to the mode
when one is active, and the mode runs :func:`captured_attention` instead: the same operations
in the same order on the same layouts, so the same output to the last bit (the tests compare
output, attention weights and every gradient with ``torch.equal`` on the torch version
``make`` pins; another version's own forward may order its sums differently). It keeps each
projection's input and the input of ``out_proj``, and hands the projections' outputs to the
recorder, which hooks them like any layer's output. Calls with what the capture does not
cover (``bias_k``, ``add_zero_attn``, static keys, unbatched inputs, a 3-d ``attn_mask``,
dropout in training mode) run torch's own function unchanged, and the rule recomputes.

In ``(T, n, E)`` layout, as the function receives its inputs, with ``h`` heads of width
``d = E / h``, the attention of head :math:`j` and the heads' outputs merged into :math:`a`:

.. math::

    [q\ k\ v] = x W_{in}^\top + b_{in}

.. math::

    a_j = \operatorname{softmax}\!\big(q_j k_j^\top / \sqrt{d} + M\big)\, v_j

.. math::

    y = a W_o^\top + b_o
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from goodfellow.layers.base import CallCapture

__all__ = ["SEPARATE_WEIGHTS", "AttentionCapture", "capturable", "captured_attention", "float_mask"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
SEPARATE_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
"""The parameters of the query, key and value weights when they are not packed in one."""


class AttentionCapture(CallCapture):
    """Active during one call of an ``nn.MultiheadAttention``; keeps what the rule needs.

    Attributes:
        inputs: Each in-projection's input, ``(T, n, E)`` as the attention function received
            it (detached), in the order of their rows in the weights.
        weights: The parameter each in-projection's weight rows live in
            (``"in_proj_weight"``, ``"q_proj_weight"``, ...).
        outputs: Each in-projection's output ``(T, n, rows)``, for the recorder to hook; its
            gradient arrives in ``grad_outputs``.
        core_output: ``out_proj``'s input :math:`a`, ``(T * n, E)`` (detached); ``None``
            when the call ran torch's own function (not captured).
    """

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []
        self.weights: list[str] = []
        self.core_output: Tensor | None = None

    def keep_projection(self, input: Tensor, output: Tensor, weight: str) -> None:
        """Note one in-projection ``output = F.linear(input, rows of weight, bias)``."""
        self.inputs.append(input.detach())
        self.outputs.append(output)
        self.weights.append(weight)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and self.core_output is None:
            bound = _SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            if capturable(bound.arguments):
                return captured_attention(self, **bound.arguments)
        return func(*args, **kwargs)


def capturable(arguments: dict) -> bool:
    """Whether :func:`captured_attention` covers a call with these arguments.

    Calls torch's function would refuse (shapes that do not fit) are left to it, so that they
    get its own error, never a broadcast it would not have made.
    """
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    mask, padding = arguments["attn_mask"], arguments["key_padding_mask"]
    packed = not arguments["use_separate_proj_weight"]
    if not (query.dim() == key.dim() == value.dim() == 3):
        return False
    (length, n, embed_dim), source = query.shape, key.shape[0]
    return (
        embed_dim == arguments["embed_dim_to_check"]
        and embed_dim % arguments["num_heads"] == 0
        and key.shape[:2] == value.shape[:2] == (source, n)
        and (not packed or key.shape == value.shape)
        and (mask is None or tuple(mask.shape) == (length, source))
        and (padding is None or tuple(padding.shape) == (n, source))
        and arguments["bias_k"] is None
        and arguments["bias_v"] is None
        and not arguments["add_zero_attn"]
        and arguments["static_k"] is None
        and arguments["static_v"] is None
        and (arguments["dropout_p"] == 0.0 or not arguments["training"])
        and not (arguments["is_causal"] and mask is None)  # torch's own function refuses it
    )


def float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as ``-inf`` where ``True`` (what torch's own canonical form is)."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _split_packed(proj: Tensor, parts: int, embed_dim: int) -> Tensor:
    """``(T, n, parts E) -> (parts, T, n, E)``, contiguous, as torch lays packed projections out."""
    split = proj.unflatten(-1, (parts, embed_dim))  # (T, n, parts, E)
    return split.unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


def captured_attention(
    capture: AttentionCapture,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: None,
    bias_v: None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: None = None,
    static_v: None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` for the calls :func:`capturable` accepts, recorded.

    Arguments and result as torch's function; the projections and the core's output are kept
    on ``capture``.
    """
    tgt_len, n, embed_dim = query.shape
    heads, head_dim = num_heads, embed_dim // num_heads
    key_padding_mask = float_mask(key_padding_mask, query.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = float_mask(attn_mask, query.dtype)
        is_causal = is_causal and key_padding_mask is None
    b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
    if not use_separate_proj_weight and query is key and key is value:
        proj = F.linear(query, in_proj_weight, in_proj_bias)  # (L, n, 3E)
        capture.keep_projection(query, proj, "in_proj_weight")
        q, k, v = _split_packed(proj, 3, embed_dim)
    elif not use_separate_proj_weight and key is value:  # cross-attention to one memory
        rows = [embed_dim, 2 * embed_dim]
        w_q, w_kv = in_proj_weight.split(rows)
        b_q, b_kv = (None, None) if in_proj_bias is None else in_proj_bias.split(rows)
        q = F.linear(query, w_q, b_q)  # (L, n, E)
        kv = F.linear(key, w_kv, b_kv)  # (S, n, 2E)
        capture.keep_projection(query, q, "in_proj_weight")
        capture.keep_projection(key, kv, "in_proj_weight")
        k, v = _split_packed(kv, 2, embed_dim)
    else:
        if use_separate_proj_weight:
            weights, names = [q_proj_weight, k_proj_weight, v_proj_weight], SEPARATE_WEIGHTS
        else:
            weights, names = list(in_proj_weight.chunk(3)), ["in_proj_weight"] * 3
        q, k, v = (
            F.linear(x, w, b)
            for x, w, b in zip((query, key, value), weights, (b_q, b_k, b_v))
        )  # (L, n, E), (S, n, E), (S, n, E)
        for x, out, name in zip((query, key, value), (q, k, v), names):
            capture.keep_projection(x, out, name)
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0)  # (1, L, S)
    q = q.view(tgt_len, n * heads, head_dim).transpose(0, 1)  # (n h, L, d)
    k = k.view(k.shape[0], n * heads, head_dim).transpose(0, 1)  # (n h, S, d)
    v = v.view(v.shape[0], n * heads, head_dim).transpose(0, 1)  # (n h, S, d)
    src_len = k.size(1)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(n, 1, 1, src_len).expand(-1, heads, -1, -1)
        padding = padding.reshape(n * heads, 1, src_len)  # (n h, 1, S)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    weights = None
    if need_weights:
        scores = q * math.sqrt(1.0 / float(head_dim))  # (n h, L, d)
        if attn_mask is None:
            scores = torch.bmm(scores, k.transpose(-2, -1))  # (n h, L, S)
        else:
            scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))  # (n h, L, S)
        weights = F.softmax(scores, dim=-1)  # (n h, L, S)
        mixed = torch.bmm(weights, v).transpose(0, 1)  # (L, n h, d)
        mixed = mixed.reshape(tgt_len * n, embed_dim)  # (L n, E)
        weights = weights.view(n, heads, tgt_len, src_len)  # (n, h, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)  # (n, L, S)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1:
                attn_mask = attn_mask.unsqueeze(0)  # (1, 1, L, S)
            else:
                attn_mask = attn_mask.view(n, heads, attn_mask.shape[-2], src_len)  # (n, h, L, S)
        q = q.view(n, heads, tgt_len, head_dim)
        k = k.view(n, heads, src_len, head_dim)
        v = v.view(n, heads, src_len, head_dim)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        mixed = mixed.permute(2, 0, 1, 3).reshape(n * tgt_len, embed_dim)  # (L n, E)
    capture.core_output = mixed.detach()
    out = F.linear(mixed, out_proj_weight, out_proj_bias)  # (L n, E)
    return out.view(tgt_len, n, out.size(1)), weights
