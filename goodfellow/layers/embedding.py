r"""The embedding rule: ``nn.Embedding``'s per-example gradients are rows added where tokens hit.

An embedding looks up row :math:`x_{i,t}` of its weight :math:`W \in \mathbb{R}^{V \times d}` at
every position ``t`` of example ``i``. With :math:`G_{i,t} = \partial L_i / \partial Z_{i,t}`
the output gradient at that position,

.. math::

    \frac{\partial L_i}{\partial W_v} = \sum_t [x_{i,t} = v]\, G_{i,t},

so the gradient is zero outside the rows the example used, and a row used at several positions
collects the sum of their gradients (``index_add``). ``padding_idx`` is a row the module never
updates: its positions are dropped. The squared norm needs no ``(n, V, d)`` tensor:

.. math::

    \Big\|\frac{\partial L_i}{\partial W}\Big\|^2
    = \sum_v \Big\|\sum_t [x_{i,t} = v] G_{i,t}\Big\|^2
    = \sum_{t,s} [x_{i,t} = x_{i,s}]\, G_{i,t} \cdot G_{i,s}.

Two exact ways to evaluate it: the right-hand side as an ``(n, T, T)`` equality mask times the
Gram matrix of :math:`G_i` (:math:`n T^2 d` work in one batched product), or the middle form,
adding rows with equal ``(i, v)`` first (``unique`` and ``index_add``: :math:`n T d` work plus a
sort). Long sequences take the second; up to ``GRAM_MAX_POSITIONS`` the faster one is timed.

Index letters: ``n`` example, ``t`` and ``s`` position, ``v`` vocabulary row, ``d`` feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from goodfellow._checks import display_name
from goodfellow.layers.base import LayerRule, register_rule
from goodfellow.layers.routes import fastest

__all__ = ["EmbeddingGradients", "EmbeddingRule", "shared_gradient_sq_norms"]

#: Up to this many positions per example the Gram form is used for the norms.
GRAM_MAX_POSITIONS = 64


class EmbeddingGradients:
    r"""One embedding's per-example gradients, kept as token ids and output gradients.

    Args:
        tokens: The looked-up rows :math:`x`, shape ``(n, T)`` (all calls laid end to end).
        grad_outputs: :math:`G`, shape ``(n, T, d)``, zero at ``padding_idx`` positions.
        num_embeddings: The vocabulary size :math:`V`.
    """

    names = ("weight",)

    def __init__(self, tokens: Tensor, grad_outputs: Tensor, num_embeddings: int) -> None:
        self.tokens = tokens
        self.grad_outputs = grad_outputs
        self.num_embeddings = num_embeddings

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.tokens.shape[0]

    def _keys(self) -> Tensor:
        """Row ``i * V + x_{i,t}`` of the ``(n V, d)`` stack of all examples' gradients."""
        n, T = self.tokens.shape
        offsets = torch.arange(n, device=self.tokens.device).unsqueeze(1) * self.num_embeddings
        return (offsets + self.tokens).reshape(n * T)  # (n T,)

    def per_example(self, out: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """``(n, V, d)``: each example's output gradients added into the rows it used."""
        n, V, G = self.batch_size, self.num_embeddings, self.grad_outputs
        d = G.shape[-1]
        buffer = None if out is None else out[0]
        result = G.new_zeros((n, V, d)) if buffer is None else buffer.zero_()
        result.view(n * V, d).index_add_(0, self._keys(), G.reshape(-1, d))
        return [result]

    def _unique_rows(self) -> tuple[Tensor, Tensor]:
        """The distinct ``(i, v)`` pairs and the sum of their positions' gradients, ``(U, d)``."""
        G = self.grad_outputs
        keys, inverse = torch.unique(self._keys(), return_inverse=True)  # (U,), (n T,)
        rows = G.new_zeros((keys.shape[0], G.shape[-1]))
        rows.index_add_(0, inverse, G.reshape(-1, G.shape[-1]))  # (U, d)
        return keys, rows

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\|^2`, ``(n,)``, by the Gram form or by unique rows (see the module).

        Beyond ``GRAM_MAX_POSITIONS`` positions the unique rows; up to it the faster of the two
        for these shapes, timed once (:func:`goodfellow.layers.routes.fastest`: at ``n = 32``,
        ``T = 64``, ``d = 128`` on 2 CPU cores unique rows took 0.28 ms, the Gram form 0.45).
        """
        tokens, G = self.tokens, self.grad_outputs
        if G.is_meta:  # shapes only: unique has no meta kernel
            return _gram_sq_norms(tokens, G)
        if tokens.shape[1] > GRAM_MAX_POSITIONS:
            return self._unique_sq_norms()
        routes = {"gram": lambda: _gram_sq_norms(tokens, G), "unique": self._unique_sq_norms}
        key = ("embedding sq norms", tuple(G.shape), self.num_embeddings, G.dtype, G.device)
        return fastest(key, routes, G.device)

    def _unique_sq_norms(self) -> Tensor:
        keys, rows = self._unique_rows()
        examples = torch.div(keys, self.num_embeddings, rounding_mode="floor")  # (U,)
        squares = torch.linalg.vecdot(rows, rows)  # (U,)
        return squares.new_zeros(self.batch_size).index_add_(0, examples, squares)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`, ``(V, d)``: the rows weighted by their example, added."""
        G = self.grad_outputs
        weighted = (weights.to(G.dtype)[:, None, None] * G).reshape(-1, G.shape[-1])  # (n T, d)
        total = G.new_zeros((self.num_embeddings, G.shape[-1]))
        return [total.index_add_(0, self.tokens.reshape(-1), weighted)]

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`, ``(V, d)``: each example's rows squared, then added."""
        keys, rows = self._unique_rows()
        vocab_rows = torch.remainder(keys, self.num_embeddings)  # (U,)
        total = rows.new_zeros((self.num_embeddings, rows.shape[-1]))
        return [total.index_add_(0, vocab_rows, rows.square())]

    def kronecker_factors(self) -> None:
        """An embedding has no Kronecker factors here (KFAC treats only Linear and Conv)."""
        return None


def _gram_sq_norms(tokens: Tensor | Sequence[Tensor], grad_outputs: Tensor) -> Tensor:
    r""":math:`\sum_{t,s} [x_t = x_s]\, G_t \cdot G_s` per example, ``(n,)``.

    ``tokens`` may hold the token ids of several embeddings whose outputs received the same
    gradient ``G``: their equality masks add up, one Gram serves all (see
    :func:`shared_gradient_sq_norms`).
    """
    token_sets = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    masks = [x.unsqueeze(2) == x.unsqueeze(1) for x in token_sets]  # (n, T, T) each
    same = masks[0] if len(masks) == 1 else sum(m.to(grad_outputs.dtype) for m in masks)
    gram = torch.bmm(grad_outputs, grad_outputs.transpose(1, 2))  # (n, T, T)
    return (gram * same).sum(dim=(1, 2))  # (n,)


def shared_gradient_sq_norms(group: Sequence[EmbeddingGradients]) -> Tensor:
    r"""The summed squared norms of embeddings whose outputs got the same gradient, ``(n,)``.

    A token and a position embedding added at a transformer's input both receive the
    gradient :math:`G` of their sum. Their squared norms add up to

    .. math::

        \begin{aligned}
        &\sum_l \sum_{t,s} [x_{l,t} = x_{l,s}]\, G_t \cdot G_s \\
        &\quad = \sum_{t,s} \Big(\sum_l [x_{l,t} = x_{l,s}]\Big)\, G_t \cdot G_s,
        \end{aligned}

    one Gram of :math:`G` for all of them. Where the Gram form applies (up to
    ``GRAM_MAX_POSITIONS``), this and each embedding's own :meth:`~EmbeddingGradients.sq_norms`
    are timed once per shape and the faster kept.

    Args:
        group: Embeddings of one batch whose ``grad_outputs`` are the same tensor.
    """
    G = group[0].grad_outputs

    def shared() -> Tensor:
        return _gram_sq_norms([layer.tokens for layer in group], G)

    def one_by_one() -> Tensor:
        return sum(layer.sq_norms() for layer in group)

    if G.shape[1] > GRAM_MAX_POSITIONS:
        return one_by_one()
    if G.is_meta:
        return shared()
    routes = {"shared gram": shared, "per embedding": one_by_one}
    key = ("shared-gradient embedding sq norms", tuple(G.shape), len(group), G.dtype, G.device)
    return fastest(key, routes, G.device)


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: rows of the output gradients added at the looked-up indices."""

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse ``max_norm``, ``sparse``, ``scale_grad_by_freq`` and subclasses.

        ``max_norm`` rewrites the weight in the forward; ``scale_grad_by_freq`` mixes the
        examples.
        """
        who = f"module {display_name(name)} ({type(module).__name__})"
        if type(module).forward is not nn.Embedding.forward:
            raise ValueError(
                f"{who} subclasses nn.Embedding with its own forward; the embedding rule "
                "handles only the plain lookup of nn.Embedding."
            )
        if module.max_norm is not None:
            raise ValueError(
                f"{who} has max_norm={module.max_norm}: it renormalizes the looked-up rows of "
                "the weight in place during the forward, so the gradient is not the plain "
                "lookup's and the weight changes under the recorder; use max_norm=None (clip "
                "the rows after the optimizer step if needed)."
            )
        if module.sparse:
            raise ValueError(
                f"{who} has sparse=True; per-example gradients are dense tensors here: "
                "construct it with sparse=False."
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                f"{who} has scale_grad_by_freq=True: each row's gradient is divided by how "
                "often its token occurs in the whole batch, which mixes the examples, so "
                "there are no per-example gradients to record; construct it with "
                "scale_grad_by_freq=False."
            )

    def min_input_dim(self, module: nn.Module) -> int:
        """Token ids ``(n, ...)``: one dimension at least."""
        return 1

    def gradients(
        self, module: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor]
    ) -> EmbeddingGradients:
        """Token ids and output gradients of all calls, laid end to end as positions."""
        n = inputs[0].shape[0]
        d = module.embedding_dim
        dtype = module.weight.dtype
        # sizes explicit: -1 is ambiguous when n = 0 (an empty Poisson-sampled batch)
        tokens = _end_to_end([x.reshape(n, math.prod(x.shape[1:])) for x in inputs])  # (n, T)
        G = _end_to_end(
            [g.to(dtype).reshape(n, math.prod(g.shape[1:-1]), d) for g in grad_outputs]
        )  # (n, T, d)
        if module.padding_idx is not None:  # the padding row receives no gradient
            G = G * (tokens != module.padding_idx).unsqueeze(-1).to(dtype)  # (n, T, d)
        return EmbeddingGradients(tokens, G, module.num_embeddings)


def _end_to_end(calls: list[Tensor]) -> Tensor:
    """The calls' positions laid end to end (dimension 1); one call as it is, not copied."""
    return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)


register_rule(nn.Embedding, EmbeddingRule())
