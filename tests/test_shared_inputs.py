"""goodfellow.layers.shared_inputs: linear layers reading one input share its Gram and w A."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import goodfellow as gf
from goodfellow.layers import routes, shared_inputs
from goodfellow.layers.shared_inputs import summed_sq_norms
from goodfellow.reference import torch_func_per_example_grads

F64 = torch.float64


class QKV(nn.Module):
    """Three projections of one input and one of another (the pattern of attention's q, k, v)."""

    def __init__(self, d: int, widths: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(d, w, bias=bias, dtype=F64) for w in widths)
        self.other = nn.Linear(d, 3, bias=True, dtype=F64)

    def forward(self, x):
        shared = torch.tanh(x)
        outputs = [p(shared) for p in self.projections]  # one input, several layers
        return sum(o.sum(-1) for o in outputs).sum(-1) + self.other(x).sum((-1, -2))


def _loss(prediction, target):
    return prediction.square().sum()


def _recorded(model, x):
    with gf.PerExampleGradients(model) as pe:
        pe.backward(_loss(model(x), None))
    return pe


ROUTES = ["shared gram", "per layer"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths", [(4, 5, 6), (7, 7)])
def test_norms_of_layers_sharing_an_input_match_torch_func(route, bias, widths):
    torch.manual_seed(0)
    model, x = QKV(5, widths, bias), torch.randn(4, 6, 5, dtype=F64)
    pe = _recorded(model, x)
    with routes.forced(route):
        norms = gf.gradient_norms(gf.recorded_factors(pe))
    grads = torch_func_per_example_grads(model, _loss, x, x)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten(1) for g in grads], 1), dim=1)
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=0)


def _group_sizes(layers, monkeypatch):
    """The sizes of the groups ``summed_sq_norms`` takes together."""
    sizes = []

    def counting(group):
        sizes.append(len(group))
        return sum(layer.sq_norms() for layer in group)

    monkeypatch.setattr(shared_inputs, "_group_sq_norms", counting)
    summed_sq_norms(layers)
    return sizes


def test_layers_are_grouped_only_by_the_tensor_they_read(monkeypatch):
    torch.manual_seed(1)
    model, x = QKV(5, (4, 5), True), torch.randn(3, 6, 5, dtype=F64)
    factors = list(gf.recorded_factors(_recorded(model, x)).values())
    assert _group_sizes(factors, monkeypatch) == [2]  # the projections of tanh(x), not `other`


def test_a_copy_of_the_input_or_one_position_is_not_grouped(monkeypatch):
    A, G1, G2 = (torch.randn(3, 4, d, dtype=F64) for d in (5, 2, 6))
    assert _group_sizes([gf.LinearFactors(A, G1, True), gf.LinearFactors(A, G2, False)],
                        monkeypatch) == [2]  # fmt: skip
    copied = [gf.LinearFactors(A, G1, True), gf.LinearFactors(A.clone(), G2, False)]
    assert _group_sizes(copied, monkeypatch) == []
    one_position = [gf.LinearFactors(A[:, :1], G1[:, :1], True)] * 2  # ||G|| ||A|| is cheaper
    assert _group_sizes(one_position, monkeypatch) == []


@st.composite
def _reading_one_input(draw, min_positions: int, min_layers: int) -> list:
    """Linear factors of 1-4 layers of random widths and biases that all read one input."""
    n, positions = draw(st.integers(1, 4)), draw(st.integers(min_positions, 6))
    d_in = draw(st.integers(1, 8))
    widths = draw(st.lists(st.integers(1, 6), min_size=min_layers, max_size=4))
    biases = draw(st.lists(st.booleans(), min_size=len(widths), max_size=len(widths)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    A = torch.randn(n, positions, d_in, generator=generator, dtype=F64)
    return [
        gf.LinearFactors(A, torch.randn(n, positions, w, generator=generator, dtype=F64), b)
        for w, b in zip(widths, biases)
    ]


@settings(max_examples=25, deadline=None)
@given(layers=_reading_one_input(min_positions=2, min_layers=2))
def test_shared_gram_equals_the_materialized_norms(layers):
    expected = sum(
        torch.cat([g.flatten(1) for g in layer.per_example()], 1).square().sum(1)
        for layer in layers
    )
    with routes.forced("shared gram"):
        torch.testing.assert_close(summed_sq_norms(layers), expected, rtol=1e-10, atol=1e-12)
    with routes.forced("per layer"):
        torch.testing.assert_close(summed_sq_norms(layers), expected, rtol=1e-10, atol=1e-12)


def test_clipped_mean_through_shared_inputs_equals_the_materialized_one():
    torch.manual_seed(3)
    model, x = QKV(5, (4, 5, 6), True), torch.randn(4, 6, 5, dtype=F64)
    pe = _recorded(model, x)
    with routes.forced("shared gram"):
        clipped = gf.clipped_mean(gf.recorded_factors(pe), max_norm=1.0)
    expected = gf.clipped_mean(pe.grads, max_norm=1.0)
    for name in expected:
        torch.testing.assert_close(clipped[name], expected[name], rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(layers=_reading_one_input(min_positions=1, min_layers=1), seed=st.integers(0, 2**16))
def test_weighted_sums_equal_the_materialized_ones(layers, seed):
    # d_in below or above the summed widths: the shared scaling of A, or each layer its own
    n = layers[0].inputs.shape[0]
    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    done = {0: [torch.zeros(1, dtype=F64)]}  # computed elsewhere: kept as it is
    sums = shared_inputs.weighted_sums(layers, weights, done)
    assert sums[0] is done[0]
    for layer, got in zip(layers[1:], sums[1:]):
        want = [torch.einsum("n,n...->...", weights, g) for g in layer.per_example()]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_layers_reading_one_input_scale_it_once(monkeypatch):
    A = torch.randn(3, 4, 5, dtype=F64)
    layers = [gf.LinearFactors(A, torch.randn(3, 4, d, dtype=F64), True) for d in (5, 5, 2)]
    scaled = []
    original = shared_inputs._layer_weighted_sum

    def recording(layer, weights, scaled_inputs=None):
        scaled.append(scaled_inputs)
        return original(layer, weights, scaled_inputs)

    monkeypatch.setattr(shared_inputs, "_layer_weighted_sum", recording)
    shared_inputs.weighted_sums(layers, torch.rand(3, dtype=F64), {})
    assert len(scaled) == 3 and all(s is scaled[0] for s in scaled)  # one w A for all three
    assert scaled[0].shape == A.shape
