"""Checks of tutorial 10 (``10_transformer``): a transformer, example by example.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from goodfellow.exercises._common import (
    _call,
    _compare,
    _generator,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 10 ---------------------------------------------------------------------------------


def check_embedding_sq_norms(embedding_sq_norms: Callable) -> bool:
    """Check exercise 10.1.

    ``embedding_sq_norms(tokens, G, padding_idx)`` returns the squared norms ``(n,)`` of the
    per-example gradients of an ``nn.Embedding``'s weight, from the ids ``(n, T)`` and the output
    gradients ``(n, T, d)``; positions holding ``padding_idx`` (an id or None) contribute nothing.
    """

    def run() -> None:
        vocabulary, n, T, d = 7, 5, 6, 3
        tokens = torch.randint(0, vocabulary, (n, T), generator=_generator(100))
        G = _randn(n, T, d, seed=101)
        for padding_idx in (None, 2):
            got = _call(embedding_sq_norms, tokens, G, padding_idx)
            embedding = nn.Embedding(vocabulary, d, padding_idx=padding_idx).double()
            expected = []
            for i in range(n):  # each example's gradient by autograd, then its norm
                (grad,) = torch.autograd.grad((embedding(tokens[i]) * G[i]).sum(), embedding.weight)
                expected.append(grad.square().sum())
            _compare(got, torch.stack(expected), f"your norms (padding_idx={padding_idx})")

    return _verdict("10.1", run)


def check_layernorm_grads(layernorm_grads: Callable) -> bool:
    """Check exercise 10.2.

    ``layernorm_grads(ln, x, G)`` returns the per-example gradients ``(weight, bias)``, each
    ``(n, d)``, of an ``nn.LayerNorm(d)`` from its input and output gradient ``(n, T, d)``.
    """

    def run() -> None:
        n, T, d = 4, 5, 6
        ln = nn.LayerNorm(d, eps=1e-3).double()  # an epsilon of its own, not the default
        with torch.no_grad():
            ln.weight.copy_(_randn(d, seed=102))
            ln.bias.copy_(_randn(d, seed=103))
        x, G = _randn(n, T, d, seed=104), _randn(n, T, d, seed=105)
        got = _call(layernorm_grads, ln, x, G)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _WrongAnswerError("return two tensors: (weight gradients, bias gradients)")
        weights, biases = [], []
        for i in range(n):
            gw, gb = torch.autograd.grad((ln(x[i]) * G[i]).sum(), [ln.weight, ln.bias])
            weights.append(gw)
            biases.append(gb)
        _compare(got[0], torch.stack(weights), "your weight gradients")
        _compare(got[1], torch.stack(biases), "your bias gradients")

    return _verdict("10.2", run)


def check_largest_gram_length(largest_gram_length: Callable) -> bool:
    """Check exercise 10.3.

    ``largest_gram_length(d_in, d_out)`` is the largest T for which the Gram form,
    ``T² (d_in + d_out)`` per example, costs no more than forming the gradient,
    ``T d_in d_out``: the rule ``goodfellow.gradient_norms`` applies to a Linear layer.
    """

    def run() -> None:
        for d_in, d_out in ((128, 128), (128, 512), (512, 128), (128, 96), (3, 5), (1, 1)):
            got = _call(largest_gram_length, d_in, d_out)
            expected = max(
                t for t in range(0, d_in * d_out + 1) if t * (d_in + d_out) <= d_in * d_out
            )
            if got != expected:
                raise _WrongAnswerError(f"for d_in = {d_in}, d_out = {d_out} the answer is off")

    return _verdict("10.3", run)
