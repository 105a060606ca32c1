"""Statistics edge cases: round-off below zero, autocast sources, empty batches, layouts.

The bulk of the statistics' tests (every statistic, both forms, against the materialized
definitions) lives in tests/test_transforms.py; this file holds what the layer-rule design added.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from goodfellow import (
    EKFAC,
    LinearFactors,
    PerExampleGradients,
    clipped_mean,
    gradient_mean,
    gradient_noise_scale,
    gradient_norms,
    gradient_variance,
    gradient_variance_trace,
    recorded_factors,
)
from goodfellow.statistics import _clipped_sum
from tests.conftest import TOLERANCES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_factored_variance_of_identical_gradients_is_not_negative(dtype):
    """g_i all equal: the factored sum g^2 - n mean^2 rounds below zero; the variance is 0."""
    torch.manual_seed(0)
    A = torch.randn(1, 1, 7, dtype=dtype).expand(64, 1, 7) * 3.3
    G = torch.randn(1, 1, 5, dtype=dtype).expand(64, 1, 5) * 1.7
    factors = LinearFactors(A.contiguous(), G.contiguous(), True)
    variance = gradient_variance(factors)
    assert all(bool((v >= 0).all()) for v in variance)
    assert float(gradient_variance_trace(factors)) >= 0
    exact = gradient_variance([t for t in factors.per_example()])
    # the factored form's error is relative to the squared mean it subtracts (cancellation)
    scale = max(float(g.square().max()) for g in gradient_mean(factors))
    for got, want in zip(variance, exact):
        torch.testing.assert_close(got, want, rtol=0, atol=64 * torch.finfo(dtype).eps * scale)


def test_recorded_factors_and_ekfac_step_under_bfloat16_autocast():
    """Issue 14, item 10: the factored statistics and EKFAC work under autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    with PerExampleGradients(model, loss_reduction="mean") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        nn.functional.mse_loss(output.float(), y).backward()
    norms = gradient_norms(recorded_factors(pe))
    torch.testing.assert_close(norms, gradient_norms(pe.grads), rtol=2e-2, atol=1e-4)
    optimizer = EKFAC(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x)
    nn.functional.mse_loss(output.float(), y).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("layout", ["list", "tuple", "dict", "factored"])
def test_clipped_sum_of_an_empty_batch_is_zero(layout):
    torch.manual_seed(0)
    A, G = torch.randn(0, 1, 3, dtype=torch.float64), torch.randn(0, 1, 2, dtype=torch.float64)
    factors = LinearFactors(A, G, True)
    tensors = factors.per_example()
    source = {
        "list": tensors,
        "tuple": tuple(tensors),
        "dict": {"w": tensors[0], "b": tensors[1]},
        "factored": factors,
    }[layout]
    result = _clipped_sum(source, 1.0)
    values = list(result.values()) if isinstance(result, dict) else list(result)
    assert [tuple(v.shape) for v in values] == [(2, 3), (2,)]
    assert all(bool((v == 0).all()) for v in values)
    with pytest.raises(ValueError, match="the batch is empty"):
        clipped_mean(source, 1.0)
    with pytest.raises(ValueError, match="the batch is empty"):
        gradient_mean(source)


def test_noise_scale_of_a_conv_net_matches_the_materialized_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(15, 2)).double()
    x, y = torch.randn(8, 2, 5, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with PerExampleGradients(model, loss_reduction="sum") as pe:
        nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(
        gradient_noise_scale(recorded_factors(pe)),
        gradient_noise_scale(pe.grads),
        **TOLERANCES[torch.float64],
    )


def test_factored_layers_of_different_batches_are_refused():
    a = LinearFactors(torch.randn(3, 1, 2), torch.randn(3, 1, 2), True)
    b = LinearFactors(torch.randn(4, 1, 2), torch.randn(4, 1, 2), True)
    with pytest.raises(ValueError, match="layer 1 holds 4 examples but layer 0 holds 3"):
        gradient_norms([a, b])
