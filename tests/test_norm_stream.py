"""PerExampleGradients.backward_with_norms: the norms taken inside the backward.

The same norms as torch.func's per-example gradients (float64) and as
``gradient_norms(recorded_factors(pe))``, on the models of the hooks, conv and transformer case
lists, on checked and unchecked batches; each layer's records dropped before the backward
ends, and a peak memory below the route that keeps them; the batch unreadable afterwards; the
refusals of the factored form (bad losses and the accounting check: beside ``backward``'s, in
``test_recorder_backward``).
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from benchmarks.run import allocated_peak_bytes
from goodfellow import (
    PerExampleGradients,
    gradient_norms,
    hooks,
    recorded_factors,
    torch_func_per_example_grads,
)
from goodfellow._hooking import recorded_edges
from tests import test_hooks
from tests.conftest import TOLERANCES
from tests.test_recorder_backward import SETUPS

F64 = TOLERANCES[torch.float64]


def _norms_of(grads):
    return torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads))  # (n,)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize(("name", "make", "case"), SETUPS, ids=[s[0] for s in SETUPS])
def test_norms_equal_torch_func_and_the_route_after_the_backward(name, make, case):
    model, x, loss, loss_fn, y = make(case)
    want = _norms_of(torch_func_per_example_grads(model, loss_fn, x, y))
    pe = PerExampleGradients(model, "sum").attach()
    for batch in range(hooks.CHECK_FIRST + 2):  # checked batches and one that is not
        if "tied" in name:  # one weight in two layers: no factored form
            with pytest.raises(ValueError, match="shares its weight"):
                pe.backward_with_norms(loss(model(x)))
            break
        got = pe.backward_with_norms(loss(model(x)))
        assert all(p.grad is None for p in model.parameters())  # .grad is never written
        torch.testing.assert_close(got, want, **F64, msg=f"batch {batch}")
        pe.backward(loss(model(x)))
        torch.testing.assert_close(got, gradient_norms(recorded_factors(pe)), **F64)
    pe.detach()


@pytest.mark.parametrize("case", test_hooks.CASES[:6], ids=[c.name for c in test_hooks.CASES[:6]])
def test_the_batch_size_factor_of_a_mean(case):
    model, x, y, loss_fn = case.make("mean", torch.float64)
    want = _norms_of(torch_func_per_example_grads(model, loss_fn, x, y))
    with PerExampleGradients(model, "mean") as pe:
        got = pe.backward_with_norms(loss_fn(test_hooks.prediction(model(x)), y))
    torch.testing.assert_close(got, want, **F64)


def _stack(width=8, depth=5):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("streamed", [True, False])
def test_each_layer_is_dropped_before_the_backward_ends(streamed):
    model = _stack()
    held = []

    def look(grad):  # the first layer's output gradient, the last of the backward
        held.append([k for k, r in pe.layers.items() if any(d is not None for d in r.grad_outputs)])

    model[0].register_forward_hook(lambda module, args, out: out.register_hook(look) and None)
    with PerExampleGradients(model) as pe:
        loss = model(torch.randn(3, 40, 8, dtype=torch.float64)).square().sum()
        pe.backward_with_norms(loss) if streamed else pe.backward(loss)
    # registered before the recorder's hook on the same output, so layer 0 is not in yet
    assert held == ([[]] if streamed else [["2", "4", "6", "8"]])


def test_autograd_returns_only_the_deepest_recorded_outputs():
    model = _stack()
    first = []
    model[0].register_forward_hook(lambda module, args, out: first.append(out.grad_fn) and None)
    with PerExampleGradients(model):
        edges = recorded_edges(model(torch.randn(3, 8, dtype=torch.float64)).sum())
    assert [edge.node for edge in edges] == first  # the other four lie above it


def test_two_branches_keep_one_deepest_output_each():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.a(x[:, :3]) + self.b(x[:, 3:])))

    model = TwoInputs().double()
    x = torch.randn(5, 5, dtype=torch.float64)
    with PerExampleGradients(model):
        assert len(recorded_edges(model(x).sum())) == 2  # a and b; head lies above both
    with PerExampleGradients(model) as pe:
        got = pe.backward_with_norms(model(x).square().sum())
    loss_fn = lambda out, y: out.square().sum()  # noqa: E731
    want = _norms_of(torch_func_per_example_grads(model, loss_fn, x, torch.zeros(5, 1)))
    torch.testing.assert_close(got, want, **F64)


def peaks_beside_a_plain_step(model, x, *steps):
    """Peak MiB of each ``step(pe, x)`` and of a plain step of a copy of ``model``.

    Each step runs twice first (the routes' timings settle), and the previous batch's records
    are cleared before the measured one, so that their freeing is not counted against it.
    """
    plain = copy.deepcopy(model)

    def plain_step(pe, x):
        plain(x).square().sum().backward()
        plain.zero_grad(set_to_none=True)

    pe = PerExampleGradients(model).attach()
    peaks = []
    for step in (*steps, plain_step):
        step(pe, x)
        step(pe, x)
        pe.clear()
        peaks.append(allocated_peak_bytes(lambda: step(pe, x)) / 2**20)  # noqa: B023
    pe.detach()
    return peaks


def test_the_peak_memory_is_a_plain_steps_not_the_route_that_keeps_the_records():
    torch.manual_seed(0)
    x = torch.randn(4, 512, 16)  # T > d: the output gradients outweigh a layer's norm work

    def kept(pe, x):
        pe.backward(pe.model(x).square().sum())
        gradient_norms(recorded_factors(pe))

    def streamed(pe, x):
        pe.backward_with_norms(pe.model(x).square().sum())

    stream, kept_peak, floor = peaks_beside_a_plain_step(_stack(16, 12).float(), x, streamed, kept)
    layer_mb = x.numel() * 4 / 2**20  # one layer's output gradient
    assert stream <= floor + layer_mb
    assert kept_peak - stream > 0.5 * 12 * layer_mb  # the kept route holds all twelve


def test_the_batch_cannot_be_read_again():
    model = _stack()
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(3, 8, dtype=torch.float64))
        pe.backward_with_norms(out.square().sum())
        for read in (lambda: pe.grads, lambda: recorded_factors(pe),
                     lambda: pe.layers["0"].per_example_grad_outputs):  # fmt: skip
            with pytest.raises(RuntimeError, match="used up by backward_with_norms"):
                read()
        pe.backward(model(torch.randn(3, 8, dtype=torch.float64)).sum())  # a new batch
        assert pe.grads["0.weight"].shape == (3, 8, 8)


def test_a_second_backward_through_the_same_forward_is_refused():
    model = nn.Linear(3, 2).double()
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(4, 3, dtype=torch.float64))
        pe.backward_with_norms(out.sum())  # stops at the output: the graph below it stays
        with pytest.raises(RuntimeError, match="a second backward went through the same"):
            out.square().sum().backward()


def test_a_failed_backward_leaves_no_batch_to_read():
    model = _stack()

    def fail(grad):
        raise ArithmeticError("stop halfway")

    with PerExampleGradients(model) as pe:
        hidden = model[:4](torch.randn(3, 8, dtype=torch.float64))
        hidden.register_hook(fail)  # after the last layer was taken and dropped
        with pytest.raises(ArithmeticError, match="stop halfway"):
            pe.backward_with_norms(model[4:](hidden).square().sum())
        with pytest.raises(RuntimeError, match="used up by backward_with_norms"):
            _ = pe.grads


def test_a_second_backward_refused_before_anything_was_taken_keeps_the_first():
    model = nn.Linear(3, 2).double()
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(4, 3, dtype=torch.float64))
        pe.backward(out.sum())
        with pytest.raises(RuntimeError, match="a second backward went through the same"):
            pe.backward_with_norms(out.square().sum())
        assert pe.grads["weight"].shape == (4, 2, 3)  # the first backward's, still readable


def test_a_frozen_weight_with_a_trained_bias_is_refused_before_the_backward():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    with PerExampleGradients(model) as pe:
        with pytest.raises(ValueError, match="frozen weight but a trainable bias"):
            pe.backward_with_norms(model(torch.randn(5, 3)).sum())
        assert not pe.backward_seen  # refused before any hook ran


def test_a_frozen_layer_is_dropped_too_and_a_model_without_trained_layers_refused():
    model = _stack()
    model[2].requires_grad_(False)
    held = []

    def look(grad):
        held.append([k for k, r in pe.layers.items() if any(d is not None for d in r.grad_outputs)])

    model[0].register_forward_hook(lambda module, args, out: out.register_hook(look) and None)
    x = torch.randn(3, 40, 8, dtype=torch.float64)
    with PerExampleGradients(model) as pe:
        got = pe.backward_with_norms(model(x).square().sum())
        assert held == [[]]
        pe.backward(model(x).square().sum())
        torch.testing.assert_close(got, gradient_norms(recorded_factors(pe)), **F64)
        model.requires_grad_(False)
        out = model(x.requires_grad_())
        with pytest.raises(ValueError, match="no layer with a trainable weight"):
            pe.backward_with_norms(out.square().sum())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    t=st.integers(1, 9),
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    calls=st.integers(1, 2),
    unused=st.booleans(),
)
def test_linear_stacks_at_positions_against_the_naive_loop(n, t, widths, calls, unused):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])]).double()
    spare = nn.Linear(widths[0], 1).double()
    owner = nn.ModuleDict({"model": model, "spare": spare})
    x = torch.randn(n, t, widths[0], dtype=torch.float64)

    def loss_of(inputs):
        if unused:
            spare(inputs)  # a recorded call whose output never reaches the loss
        # the model applied `calls` times: its layers' calls add up
        return sum(model(inputs * (c + 1)) for c in range(calls)).square().sum()

    want = []
    for i in range(n):
        grads = torch.autograd.grad(loss_of(x[i : i + 1]), list(model.parameters()))
        want.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    with PerExampleGradients(owner) as pe:
        got = pe.backward_with_norms(loss_of(x))
    torch.testing.assert_close(got, torch.stack(want), **F64)
