"""PerExampleGradients.backward: the backward to the recorded outputs only, and its checks.

The same per-example gradients and statistics as after ``loss.backward()`` (against torch.func,
float64), on the models of the hooks, conv and transformer case lists; no ``.grad`` written; the
accounting check still refuses a parameter used outside its module on the batches it checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from goodfellow import (
    PerExampleGradients,
    clipped_mean,
    gradient_norms,
    hooks,
    recorded_factors,
    torch_func_per_example_grads,
)
from tests import test_conv, test_hooks, test_transformers
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]
BACKWARDS = ["backward", "backward_with_norms"]  # the recorder's two backwards check alike


def _hooks_case(case):
    model, x, y, loss_fn = case.make("sum", torch.float64)
    return model, x, lambda out: loss_fn(test_hooks.prediction(out), y), loss_fn, y


def _conv_case(case):
    model, x, y = case.make()
    loss_fn = nn.MSELoss(reduction="sum")
    return model, x, lambda out: loss_fn(out, y), loss_fn, y


def _transformer_case(case):
    model, x, y, loss_fn = test_transformers.make(case, "sum")
    return model, x, lambda out: loss_fn(out, y), loss_fn, y


SETUPS = (
    [(f"hooks-{c.name}", _hooks_case, c) for c in test_hooks.CASES]
    + [(f"conv-{c.name}", _conv_case, c) for c in test_conv.CASES[::3]]
    + [(f"transformer-{c.name}", _transformer_case, c) for c in test_transformers.CASES]
)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize(("name", "make", "case"), SETUPS, ids=[s[0] for s in SETUPS])
def test_same_per_example_gradients_as_after_loss_backward(name, make, case):
    model, x, loss, loss_fn, y = make(case)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    want = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    pe = PerExampleGradients(model, "sum").attach()
    for batch in range(hooks.CHECK_FIRST + 2):  # checked batches and one that is not
        pe.backward(loss(model(x)))
        assert all(p.grad is None for p in model.parameters())  # .grad is never written
        for key, expected in want.items():
            torch.testing.assert_close(pe.grads[key], expected, **F64, msg=f"{key}, {batch}")
        if "tied" in name:  # one weight in two layers: no factored form (refused)
            continue
        factored = recorded_factors(pe)
        torch.testing.assert_close(gradient_norms(factored), gradient_norms(want), **F64)
        got, expected = clipped_mean(factored, 0.5), clipped_mean(want, 0.5)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **F64, msg=key)
    pe.detach()


def test_inplace_activation_after_the_layer():
    """The edge is taken before ``ReLU(inplace=True)`` rewrites the output's history."""
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    want = torch_func_per_example_grads(model, loss_fn, x, y)
    with PerExampleGradients(model) as pe:
        pe.backward(loss_fn(model(x), y))
    for got, expected in zip(pe.grads.values(), want):
        torch.testing.assert_close(got, expected, **F64)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_parameter_used_outside_its_module_is_still_refused(backward):
    layer = nn.Linear(4, 4).double()

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return torch.tanh(self.layer(x)) + x @ layer.weight.T

    model = Outside()
    with PerExampleGradients(model) as pe:
        loss = model(torch.randn(6, 4, dtype=torch.float64)).square().sum()
        with pytest.raises(ValueError, match=r"'layer.weight' do not add up"):
            getattr(pe, backward)(loss)  # backward_with_norms: refused inside the backward
            _ = pe.grads  # backward: refused when the results are read
    assert layer.weight.grad is None


def test_the_summed_gradients_are_formed_only_on_checked_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(g))
    pe = PerExampleGradients(model).attach()
    for _ in range(hooks.CHECK_EVERY):
        pe.backward(model(torch.randn(5, 3, dtype=torch.float64)).square().sum())
    pe.detach()
    # batches 1-3 and 10 differentiate the parameters, the six in between do not
    assert len(seen) == hooks.CHECK_FIRST + 1


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(
    ("loss", "error", "message"),
    [
        ([1.0], TypeError, "loss must be a tensor, got list"),
        ("vector", ValueError, r"loss must be a scalar that requires grad, got shape \(5, 2\)"),
        ("detached", ValueError, "requires_grad=False"),
    ],
)
def test_bad_losses_are_refused(loss, error, message, backward):
    model = nn.Linear(3, 2)
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(5, 3))
        if loss == "vector":
            loss = out
        elif loss == "detached":
            loss = out.sum().detach()
        with pytest.raises(error, match=message):
            getattr(pe, backward)(loss)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_backward_without_a_waiting_forward_is_refused(backward):
    model = nn.Linear(3, 2)
    with PerExampleGradients(model) as pe:
        with pytest.raises(RuntimeError, match="no recorded layer output is waiting"):
            getattr(pe, backward)(torch.ones((), requires_grad=True))  # nothing ran yet
    unrecorded = model(torch.randn(5, 3)).sum()  # ran while nothing was attached
    with PerExampleGradients(model) as pe:
        with pytest.raises(RuntimeError, match="no recorded layer output is waiting"):
            getattr(pe, backward)(unrecorded)
