"""goodfellow.layers.position_norms: the banded Gram norms against the definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from goodfellow.layers.position_norms import band_height, gram_count, gram_sq_norms

F64 = torch.float64


def _definition(A: torch.Tensor, Gs: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||sum_t G_lt A_t^T||^2 per example, from the formed gradients."""
    return sum(torch.einsum("nto,nti->noi", G, A).square().sum(dim=(1, 2)) for G in Gs)


def _with_ones(A: torch.Tensor) -> torch.Tensor:
    """A column of ones appended to every position's input: the bias as a weight."""
    return torch.cat([A, A.new_ones(*A.shape[:2], 1)], dim=2)


# (positions, widths of the output gradients): one band (T <= 128), bands that divide T, a
# short last band, and several layers sharing the input (q, k, v)
CASES = [(1, [3]), (2, [5]), (64, [6]), (100, [3, 5]), (128, [4]), (129, [4]),
         (256, [2, 2, 3]), (600, [3])]  # fmt: skip


@pytest.mark.parametrize(("positions", "widths"), CASES, ids=str)
def test_banded_gram_equals_the_formed_norms(positions, widths):
    generator = torch.Generator().manual_seed(positions)
    A = torch.randn(3, positions, 5, dtype=F64, generator=generator)
    Gs = [torch.randn(3, positions, w, dtype=F64, generator=generator) for w in widths]
    expected = _definition(A, Gs)
    torch.testing.assert_close(gram_sq_norms(A, Gs), expected, rtol=1e-12, atol=0)
    if len(Gs) == 1:
        torch.testing.assert_close(gram_sq_norms(A, Gs[0]), expected, rtol=1e-12, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3),
    positions=st.integers(1, 300),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_banded_gram_on_any_shape(n, positions, d_in, d_out, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(n, positions, d_in, dtype=F64, generator=generator)
    G = torch.randn(n, positions, d_out, dtype=F64, generator=generator)
    torch.testing.assert_close(gram_sq_norms(A, G), _definition(A, [G]), rtol=1e-11, atol=1e-12)


def test_bands_are_four_and_at_least_128_rows():
    assert [band_height(t) for t in (1, 64, 128, 129, 512, 513, 1024)] == [
        128, 128, 128, 128, 128, 129, 256,
    ]  # fmt: skip


@pytest.mark.parametrize(("positions", "widths"), CASES, ids=str)
def test_gram_with_bias_adds_each_bias_gradient_norm(positions, widths):
    # a bias is a weight on a constant input 1: the definition with a column of ones on A
    generator = torch.Generator().manual_seed(positions + 1)
    A = torch.randn(3, positions, 5, dtype=F64, generator=generator)
    Gs = [torch.randn(3, positions, w, dtype=F64, generator=generator) for w in widths]
    expected = _definition(_with_ones(A), Gs)
    torch.testing.assert_close(gram_sq_norms(A, Gs, bias=True), expected, rtol=1e-12, atol=0)
    biases = sum(G.sum(dim=1).square().sum(dim=1) for G in Gs)
    torch.testing.assert_close(expected - _definition(A, Gs), biases, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positions", [8, 32, 64, 128, 256, 1024])
def test_gram_count_is_what_the_bands_multiply(positions):
    # with bands that divide T, the products formed are h x (T - start) per band and width
    height = min(band_height(positions), positions)
    formed = sum(height * (positions - start) for start in range(0, positions, height))
    assert gram_count(positions, 3, 5) == pytest.approx(formed * 8)
    assert gram_count(positions, 3, 5) <= positions**2 * 8


@pytest.mark.parametrize("positions", [5, 130])
def test_gram_norms_with_bias_are_differentiable(positions):
    # under create_graph the recorded factors carry a graph: the in-place + 1 on A A^T must
    # leave the gradients of the norms right (one band and two)
    generator = torch.Generator().manual_seed(positions)
    A = torch.randn(2, positions, 3, dtype=F64, generator=generator, requires_grad=True)
    G = torch.randn(2, positions, 4, dtype=F64, generator=generator, requires_grad=True)
    weights = torch.tensor([0.3, -1.2], dtype=F64)
    got = torch.autograd.grad(weights @ gram_sq_norms(A, G, bias=True), (A, G))
    want = torch.autograd.grad(weights @ _definition(_with_ones(A), [G]), (A, G))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
