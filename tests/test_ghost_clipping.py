"""goodfellow.ghost_clipped_mean: the clipped mean from two backwards through one forward.

The same numbers as the clipped mean of torch.func's per-example gradients (float64) and as
``clipped_mean(recorded_factors(pe))``, on the models of the hooks, conv and transformer case
lists, on checked and unchecked batches and for both loss reductions; no ``.grad`` written and
the next batch recorded as usual; a peak memory below the one-backward clipped mean's where
the records outweigh a layer's work; every refusal.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from goodfellow import (
    PerExampleGradients,
    clipped_mean,
    ghost_clipped_mean,
    hooks,
    recorded_factors,
    torch_func_per_example_grads,
)
from tests import test_hooks
from tests.conftest import TOLERANCES
from tests.test_norm_stream import _stack, peaks_beside_a_plain_step
from tests.test_recorder_backward import SETUPS

pytestmark = [
    # torch.func's per-example loop over nn.MultiheadAttention's CPU flash attention (the
    # reference is slower, not different).
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
]

F64 = TOLERANCES[torch.float64]
C = 0.5


def _per_example_losses(out, loss_fn, y):
    """Each example's loss under a summed ``loss_fn``: the batch's output cut into rows."""
    pred = test_hooks.prediction(out)
    return torch.stack([loss_fn(pred[i : i + 1], y[i : i + 1]) for i in range(pred.shape[0])])


def _reference(model, loss_fn, x, y, max_norm=C):
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    per_example = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    return clipped_mean(per_example, max_norm)


def _assert_close(got, want):
    assert list(got) == list(want)
    for key, expected in want.items():
        torch.testing.assert_close(got[key], expected, **F64, msg=key)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize(("name", "make", "case"), SETUPS, ids=[s[0] for s in SETUPS])
def test_equals_torch_func_and_the_one_backward_clipped_mean(name, make, case):
    model, x, loss, loss_fn, y = make(case)
    want = _reference(model, loss_fn, x, y)
    pe = PerExampleGradients(model, "sum").attach()
    for _batch in range(hooks.CHECK_FIRST + 2):  # checked batches and one that is not
        losses = _per_example_losses(model(x), loss_fn, y)
        if "tied" in name:  # one weight in two layers: no factored form
            with pytest.raises(ValueError, match="shares its weight"):
                ghost_clipped_mean(pe, losses, C)
            break
        got = ghost_clipped_mean(pe, losses, C)
        assert all(p.grad is None for p in model.parameters())  # .grad is never written
        _assert_close(got, want)
        pe.backward(loss(model(x)))  # the next batch is recorded as before
        _assert_close(clipped_mean(recorded_factors(pe), C), want)
    pe.detach()


@pytest.mark.parametrize("case", test_hooks.CASES[:6], ids=[c.name for c in test_hooks.CASES[:6]])
def test_a_mean_reduced_recorder_gives_the_same_clipped_mean(case):
    model, x, y, loss_fn = case.make("sum", torch.float64)
    want = _reference(model, loss_fn, x, y)
    with PerExampleGradients(model, "mean") as pe:  # it undoes the mean's 1/n itself
        got = ghost_clipped_mean(pe, _per_example_losses(model(x), loss_fn, y), C)
    _assert_close(got, want)


@given(
    max_norm=st.floats(1e-3, 10.0),
    n=st.integers(1, 6),
    positions=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_any_clipping_norm_batch_and_positions_against_the_reference(max_norm, n, positions, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(n, positions, 3, dtype=torch.float64)
    y = torch.randn(n, positions, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    want = _reference(model, loss_fn, x, y, max_norm)
    with PerExampleGradients(model) as pe:
        got = ghost_clipped_mean(pe, _per_example_losses(model(x), loss_fn, y), max_norm)
    _assert_close(got, want)


def test_an_untrained_parameter_gets_zeros():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    with PerExampleGradients(model) as pe:
        got = ghost_clipped_mean(pe, _per_example_losses(model(x), loss_fn, y), C)
    assert got["unused.weight"].equal(torch.zeros(2, 3, dtype=torch.float64))
    with PerExampleGradients(model) as pe:
        pe.backward(loss_fn(model(x), y))
        want = clipped_mean(recorded_factors(pe), C)
    _assert_close(got, want)


def test_the_peak_memory_is_a_plain_steps_not_the_one_backward_clipped_means():
    torch.manual_seed(0)
    x = torch.randn(4, 512, 16)  # T > d: the output gradients outweigh a layer's norm work

    def one_backward(pe, x):
        pe.backward(pe.model(x).square().sum())
        clipped_mean(recorded_factors(pe), C)

    def two_backwards(pe, x):
        ghost_clipped_mean(pe, pe.model(x).square().sum(dim=(1, 2)), C)

    model = _stack(16, 12).float()
    ghost, kept, floor = peaks_beside_a_plain_step(model, x, two_backwards, one_backward)
    layer_mb = x.numel() * 4 / 2**20  # one layer's output gradient
    assert ghost <= floor + layer_mb
    assert kept - ghost > 0.5 * 12 * layer_mb  # the one-backward route holds all twelve


def test_the_batch_cannot_be_read_again():
    model = _stack(16, 6)
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(3, 16, dtype=torch.float64))
        ghost_clipped_mean(pe, out.square().sum(dim=1), C)
        with pytest.raises(RuntimeError, match="used up by backward_with_norms"):
            pe.grads  # noqa: B018


def _recorded(n=4):
    model = nn.Linear(3, 2).double()
    pe = PerExampleGradients(model).attach()
    out = model(torch.randn(n, 3, dtype=torch.float64))
    return pe, out


@pytest.mark.parametrize(
    ("losses", "error", "match"),
    [
        (lambda out: [1.0, 2.0, 3.0, 4.0], TypeError, "losses must be a tensor"),
        (lambda out: out.square().sum(), ValueError, r"shape \(4,\), that require grad; got \(\)"),
        (lambda out: out.square(), ValueError, r"got \(4, 2\)"),
        (lambda out: out.square().sum(1)[:3], ValueError, r"got \(3,\)"),
        (lambda out: out.square().sum(1).detach(), ValueError, "requires_grad=False"),
    ],
    ids=["not-a-tensor", "summed", "per-entry", "too-few", "detached"],
)
def test_losses_that_are_not_one_per_example_are_refused(losses, error, match):
    pe, out = _recorded()
    with pytest.raises(error, match=match):
        ghost_clipped_mean(pe, losses(out), C)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan, "1"])
def test_a_clipping_norm_that_is_not_positive_and_finite_is_refused(max_norm):
    pe, out = _recorded()
    with pytest.raises((TypeError, ValueError), match="max_norm"):
        ghost_clipped_mean(pe, out.square().sum(1), max_norm)


def test_without_a_recorded_forward_it_says_to_run_one():
    model = nn.Linear(3, 2).double()
    out = model(torch.randn(4, 3, dtype=torch.float64))  # before the recorder is attached
    with PerExampleGradients(model) as pe:
        with pytest.raises(RuntimeError, match="no forward of this batch was recorded"):
            ghost_clipped_mean(pe, out.square().sum(1), C)


def test_only_an_attached_recorder_is_taken():
    pe, out = _recorded()
    with pytest.raises(TypeError, match="pe must be a goodfellow.PerExampleGradients"):
        ghost_clipped_mean(pe.model, out.square().sum(1), C)
    pe.detach()
    with pytest.raises(RuntimeError, match="the recorder is detached"):
        ghost_clipped_mean(pe, out.square().sum(1), C)
    assert not pe.attached


def test_the_hooks_record_again_after_the_second_backward():
    pe, out = _recorded()
    ghost_clipped_mean(pe, out.square().sum(1), C)
    assert pe.attached
    x = torch.randn(5, 3, dtype=torch.float64)
    pe.backward(pe.model(x).square().sum())
    assert pe.grads["weight"].shape == (5, 2, 3)


def test_a_diverged_example_is_named():
    pe, out = _recorded()
    losses = out.square().sum(1) * torch.tensor([1.0, math.inf, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or inf"):
        ghost_clipped_mean(pe, losses, C)
