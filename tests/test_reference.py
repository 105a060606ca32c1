"""The references and the check built on them: random forwards, and models that mix examples.

``check_per_example_gradients`` is tested on models where the answer is known: plain MLPs (the
recorder is right, so every parameter must agree, and the recorded gradients are the naive
loop's) and models or losses that mix the examples of a batch (centering by the batch mean, a
pairwise loss), where the recorder is wrong by construction and the check must name exactly the
parameters the mixing reaches.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import goodfellow
from goodfellow import (
    PerExampleGradientCheck,
    PerExampleGradients,
    check_per_example_gradients,
    naive_per_example_grads,
    torch_func_per_example_grads,
)
from tests.conftest import TOLERANCES


class Centered(nn.Module):
    """Two Linear layers with the hidden features centred by their batch mean in between.

    Example ``i``'s output depends on every example through the mean, so the gradient of the
    batch loss w.r.t. the first layer's output is not the sum of the examples' own. The last
    layer's input is centred but each of its rows belongs to one example: its weight's recorded
    gradient is the example's own given the batch, while a batch of one centres to zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.second(h - h.mean(0, keepdim=True))


def pairwise_loss(prediction, target):
    """Mean squared difference of the errors of all pairs: zero for a batch of one."""
    error = (prediction - target).sum(1)  # (n,)
    return (error[:, None] - error[None, :]).square().mean()


def _batch(d_in=4, d_out=3, n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=generator, dtype=torch.float64)
    return x, y


def _mlp(seed=0, dropout=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), nn.Tanh()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(5, 3)).double()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_that_keeps_examples_apart_agrees(reduction, dtype):
    model = _mlp().to(dtype)
    x, y = (t.to(dtype) for t in _batch())
    result = check_per_example_gradients(model, nn.MSELoss(reduction=reduction), x, y)
    assert isinstance(result, PerExampleGradientCheck)
    assert result and result.agrees and result.disagreeing == []
    assert list(result.max_abs_errors) == [name for name, _ in model.named_parameters()]
    tolerance = TOLERANCES[dtype]["atol"] * 10
    assert all(error < tolerance for error in result.max_abs_errors.values())
    assert "agree" in str(result)


def test_the_errors_it_reports_are_those_against_the_naive_loop():
    # an independent reference for the numbers the check compares: recorder and naive loop
    model = Centered().double()
    x, y = _batch()
    loss_fn = nn.MSELoss(reduction="sum")
    result = check_per_example_gradients(model, loss_fn, x, y)
    with PerExampleGradients(model, loss_reduction="sum") as recorder:
        loss_fn(model(x), y).backward()
        recorded = {name: g.clone() for name, g in recorder.grads.items()}
    naive = naive_per_example_grads(model, loss_fn, x, y)
    for (name, _), reference in zip(model.named_parameters(), naive):
        expected = float((recorded[name] - reference).abs().max())
        assert result.max_abs_errors[name] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_centering_by_the_batch_mean_is_named_parameter_by_parameter():
    model = Centered().double()
    x, y = _batch()
    result = check_per_example_gradients(model, nn.MSELoss(), x, y)
    assert not result
    # alone, an example's centred features are zero: the second weight and everything before
    # the mean get other gradients, and the second bias's output gradient is taken at another
    # output, so it disagrees as well
    assert result.disagreeing[:3] == ["first.weight", "first.bias", "second.weight"]
    for name in result.disagreeing:
        assert result.max_abs_errors[name] > 1e-3
        assert repr(name) in str(result)
    assert "mixes the examples" in str(result)


def test_a_pairwise_loss_is_named_and_can_raise():
    model = _mlp()
    x, y = _batch()
    result = check_per_example_gradients(model, pairwise_loss, x, y, loss_reduction="mean")
    assert set(result.disagreeing) == {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"4 of 4 parameters disagree.*'0.weight' \(max abs"):
        check_per_example_gradients(
            model, pairwise_loss, x, y, loss_reduction="mean", raise_on_mismatch=True
        )


def test_the_check_leaves_grad_and_hooks_alone():
    model = _mlp()
    x, y = _batch()
    check_per_example_gradients(model, nn.MSELoss(), x, y)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_loose_tolerances_accept_what_tight_ones_refuse():
    model = Centered().double()
    x, y = _batch()
    worst = max(check_per_example_gradients(model, nn.MSELoss(), x, y).max_abs_errors.values())
    assert check_per_example_gradients(model, nn.MSELoss(), x, y, atol=2 * worst, rtol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rtol": -1.0}, ValueError, "rtol must be a non-negative finite number"),
        ({"atol": float("nan")}, ValueError, "atol must be a non-negative finite number"),
        ({"atol": "1e-6"}, TypeError, "atol must be a non-negative number"),
        ({"loss_reduction": "none"}, ValueError, "loss_reduction must be one of"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, match):
    model = _mlp()
    x, y = _batch()
    loss_fn = nn.MSELoss(reduction="none") if "loss_reduction" in kwargs else nn.MSELoss()
    kwargs = {key: value for key, value in kwargs.items() if key != "loss_reduction"}
    with pytest.raises(error, match=match):
        check_per_example_gradients(model, loss_fn, x, y, **kwargs)


def test_a_plain_function_needs_its_reduction():
    model = _mlp()
    x, y = _batch()
    with pytest.raises(TypeError, match="pass loss_reduction='sum' or 'mean'"):
        check_per_example_gradients(model, pairwise_loss, x, y)


# --- random forwards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: torch_func_per_example_grads(m, nn.MSELoss(), x, y),
        lambda m, x, y: check_per_example_gradients(m, nn.MSELoss(), x, y),
    ],
    ids=["torch_func_per_example_grads", "check_per_example_gradients"],
)
def test_dropout_in_training_mode_is_refused_with_what_to_do(call):
    model = _mlp(dropout=0.5)
    x, y = _batch()
    with pytest.raises(ValueError, match=r"random numbers \(Dropout in training mode: \['2'\]\)"
                       r".*model\.eval\(\)"):  # fmt: skip
        call(model, x, y)


def test_dropout_in_eval_mode_is_the_naive_loop():
    model = _mlp(dropout=0.5).eval()
    x, y = _batch()
    loss_fn = nn.MSELoss()
    got = torch_func_per_example_grads(model, loss_fn, x, y)
    for g, want in zip(got, naive_per_example_grads(model, loss_fn, x, y)):
        torch.testing.assert_close(g, want, **TOLERANCES[torch.float64])
    assert check_per_example_gradients(model, loss_fn, x, y)


def test_other_runtime_errors_of_the_forward_are_not_rewritten():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            raise RuntimeError("a bug in the model")

    with pytest.raises(RuntimeError, match="a bug in the model"):
        torch_func_per_example_grads(Broken().double(), nn.MSELoss(), *_batch())


def test_public_names_and_docstring_example():
    for name in ("check_per_example_gradients", "PerExampleGradientCheck"):
        assert name in goodfellow.__all__ and hasattr(goodfellow, name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    names = {"torch": torch, "check_per_example_gradients": check_per_example_gradients}
    for test in doctest.DocTestFinder().find(check_per_example_gradients, globs=names):
        runner.run(test)
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0 and summary.failed == 0
