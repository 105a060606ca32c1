"""goodfellow.layers.formed_clipping: the clipped sum in one pass over the formed layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import goodfellow as gf
from goodfellow.layers import position_norms, routes
from goodfellow.layers.formed_clipping import SEPARATE, norms_and_formed_sums
from goodfellow.layers.position_norms import forms_its_norms
from goodfellow.reference import torch_func_per_example_grads
from goodfellow.sources import _layers
from goodfellow.transforms import _clip_factors

F64 = torch.float64
EXACT = {"rtol": 1e-10, "atol": 1e-12}


class Sequence(nn.Module):
    """Token embedding, LayerNorm, a Linear used twice and two more, on (n, T) tokens."""

    def __init__(self, d: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, d, dtype=F64)
        self.norm = nn.LayerNorm(d, dtype=F64)
        self.shared = nn.Linear(d, d, bias=bias, dtype=F64)
        self.up = nn.Linear(d, hidden, bias=bias, dtype=F64)
        self.down = nn.Linear(hidden, 2, bias=True, dtype=F64)

    def forward(self, tokens):
        h = self.norm(self.embedding(tokens))  # (n, T, d)
        h = self.shared(torch.tanh(self.shared(h)))  # one layer applied twice
        return self.down(torch.tanh(self.up(h))).sum(-1)  # (n, T)


def _loss(prediction, target):
    return (prediction - target).square().sum()


def _case(d: int, hidden: int, positions: int, bias: bool, n: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = Sequence(d, hidden, bias)
    tokens = torch.randint(0, 7, (n, positions))
    targets = torch.randn(n, positions, dtype=F64)
    with gf.PerExampleGradients(model, loss_reduction="sum") as pe:
        pe.backward(_loss(model(tokens), targets))
    return model, tokens, targets, gf.recorded_factors(pe)


def _reference_clipped_mean(model, tokens, targets, max_norm):
    grads = torch_func_per_example_grads(model, _loss, tokens, targets)
    flat = torch.cat([g.flatten(1) for g in grads], dim=1)  # (n, P)
    factors = torch.clamp(max_norm / torch.linalg.vector_norm(flat, dim=1), max=1.0)
    return [torch.einsum("n,n...->...", factors, g) / len(factors) for g in grads]


def _in_parameter_order(model, clipped: dict):
    return [clipped[name] for name, _ in model.named_parameters()]


# widths and positions: every layer formed by its counts (2, 3 at 12 positions), a mix, and
# none (the Gram route by count for 8 -> 8 at 2 positions)
SHAPES = [(2, 3, 12), (3, 16, 6), (8, 8, 2)]


@pytest.mark.parametrize("route", ["materialized", "gram", SEPARATE, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}-h{}-T{}".format(*s))
def test_the_clipped_mean_matches_torch_func_by_every_route(route, bias, shape):
    model, tokens, targets, factors = _case(*shape, bias)
    max_norm = 0.5  # most examples clipped, not all
    expected = _reference_clipped_mean(model, tokens, targets, max_norm)
    if route is None:  # the timed choice
        clipped = gf.clipped_mean(factors, max_norm)
    else:
        with routes.forced(route):
            clipped = gf.clipped_mean(factors, max_norm)
    for got, want in zip(_in_parameter_order(model, clipped), expected):
        torch.testing.assert_close(got, want, **EXACT)


def test_the_formed_layers_are_those_whose_norms_are_formed():
    *_, factors = _case(2, 3, 12, bias=True)  # 2 -> 2, 2 -> 3, 3 -> 2 at 12 positions
    _, layers, _ = _layers(factors)
    norms, sums = norms_and_formed_sums(layers, 0.5, _clip_factors)
    kinds = [type(layer).__name__ for layer in layers]
    formed = {k for k, layer in enumerate(layers) if kinds[k] == "LinearFactors"}
    assert set(sums) == formed
    assert all(forms_its_norms(layers[k].inputs, layers[k].grad_outputs) for k in formed)
    torch.testing.assert_close(norms, gf.gradient_norms(factors), **EXACT)
    # Where every layer takes the Gram route, nothing is formed. (These shapes are left to
    # timing, not decided by count: the output layer's width 2 never lets the count decide.)
    *_, factors = _case(8, 8, 2, bias=True)
    _, layers, _ = _layers(factors)
    with routes.forced("gram"):
        assert norms_and_formed_sums(layers, 0.5, _clip_factors)[1] == {}


# one example's formed weight gradients of _case(2, 3, 12): 2x2 + 3x2 + 2x3 float64 = 128 bytes
ONE_EXAMPLE_BYTES = 128


@pytest.mark.parametrize(
    "chunk_bytes", [ONE_EXAMPLE_BYTES, 2 * ONE_EXAMPLE_BYTES + 50, 10**9],
    ids=["one_example", "two_examples", "all"],
)  # fmt: skip
def test_chunks_of_any_size_give_the_same_clipped_mean(chunk_bytes, monkeypatch):
    model, tokens, targets, factors = _case(2, 3, 12, bias=True, n=7)
    expected = _reference_clipped_mean(model, tokens, targets, 0.5)
    monkeypatch.setattr(position_norms, "_CHUNK_BYTES", chunk_bytes)
    clipped = gf.clipped_mean(factors, 0.5)
    for got, want in zip(_in_parameter_order(model, clipped), expected):
        torch.testing.assert_close(got, want, **EXACT)


def test_a_budget_below_one_example_takes_two_passes(monkeypatch):
    """Memory stays within the budget: no chunk of one example's gradients above it."""
    model, tokens, targets, factors = _case(2, 3, 12, bias=True, n=7)
    _, layers, _ = _layers(factors)
    monkeypatch.setattr(position_norms, "_CHUNK_BYTES", ONE_EXAMPLE_BYTES)
    assert norms_and_formed_sums(layers, 0.5, _clip_factors)[1] != {}  # one pass, fits
    monkeypatch.setattr(position_norms, "_CHUNK_BYTES", ONE_EXAMPLE_BYTES - 1)
    norms, sums = norms_and_formed_sums(layers, 0.5, _clip_factors)
    assert sums == {}  # two passes
    torch.testing.assert_close(norms, gf.gradient_norms(factors), **EXACT)
    expected = _reference_clipped_mean(model, tokens, targets, 0.5)
    clipped = gf.clipped_mean(factors, 0.5)
    for got, want in zip(_in_parameter_order(model, clipped), expected):
        torch.testing.assert_close(got, want, **EXACT)


def test_private_mean_takes_the_same_clipped_sum():
    model, tokens, targets, factors = _case(2, 3, 12, bias=True)
    noiseless = gf.private_mean(factors, 0.5, noise_multiplier=0.0)
    with routes.forced(SEPARATE):
        separate = gf.private_mean(factors, 0.5, noise_multiplier=0.0)
    for name in noiseless:
        torch.testing.assert_close(noiseless[name], separate[name], **EXACT)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 4), hidden=st.integers(1, 6), positions=st.integers(2, 16),
    n=st.integers(1, 6), bias=st.booleans(), max_norm=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_one_pass_and_two_passes_agree(d, hidden, positions, n, bias, max_norm, seed):
    _, _, _, factors = _case(d, hidden, positions, bias, n=n, seed=seed)
    with routes.forced("materialized"):
        one_pass = gf.clipped_mean(factors, max_norm)
    with routes.forced(SEPARATE):
        two_passes = gf.clipped_mean(factors, max_norm)
    for name in one_pass:
        torch.testing.assert_close(one_pass[name], two_passes[name], **EXACT)
