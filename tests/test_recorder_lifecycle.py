"""The recorder over a training run: failed forwards, copies, pickles, garbage, empty batches.

Each test is one item of issue 14 ("never a silently wrong number") that concerns the life of a
PerExampleGradients rather than its formulas; the numbers are checked against torch.func.
"""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from torch import nn

from goodfellow import EKFAC, PerExampleGradients, recorded_factors, torch_func_per_example_grads
from goodfellow.statistics import gradient_norms
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]


class Fragile(nn.Module):
    """A model whose forward raises half-way on request, after its first Linear ran."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x, bad: bool = False):
        h = torch.tanh(self.first(x))
        if bad:
            raise ValueError("corrupt batch")
        return self.second(h)


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_forward_that_raised_half_way_is_forgotten():
    """Item 11: a bad batch skipped with try/except does not break later batches."""
    model = Fragile().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    with PerExampleGradients(model) as pe:
        with pytest.raises(ValueError, match="corrupt"):
            model(torch.randn(5, 4, dtype=torch.float64), bad=True)
        nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    assert pe.layers["first"].num_calls == 1
    want = torch_func_per_example_grads(model, nn.MSELoss(reduction="sum"), x, y)
    for got, expected in zip(pe.grads.values(), want):
        torch.testing.assert_close(got, expected, **F64)


def test_a_failed_forward_keeps_the_complete_forwards_of_its_batch():
    model = Fragile().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with PerExampleGradients(model) as pe:
        out = model(x)
        with pytest.raises(ValueError, match="corrupt"):
            model(x, bad=True)
        out.sum().backward()
    assert pe.layers["first"].num_calls == 1 and pe.layers["second"].num_calls == 1
    torch.testing.assert_close(pe.grads["second.bias"], torch.ones(6, 3, dtype=torch.float64))


def test_the_model_can_be_saved_while_ekfac_is_attached():
    """Item 12: torch.save of the model; the loaded copy carries inert hooks."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 3)
    torch.testing.assert_close(loaded(x), model(x))
    assert optimizer.recorder.layers["0"].num_calls == 1  # only the original's forward counted


def test_a_deep_copy_does_not_feed_the_original_recorder():
    """Item 16: the copy's forwards are not recorded by the original's recorder."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pe = PerExampleGradients(model).attach()
    twin = copy.deepcopy(model)
    for _ in range(5):
        twin(torch.randn(2, 3)).sum().backward()
    assert pe.layers["0"].num_calls == 0
    pe.detach()
    assert hooks_on(model) == 0


def test_optimizers_nobody_holds_take_their_hooks_with_them():
    """Item 16: creating EKFAC again and again does not pile up hooks."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for _ in range(30):
        optimizer = EKFAC(model, lr=0.1)
    del optimizer
    gc.collect()
    assert hooks_on(model) == 0
    kept = EKFAC(model, lr=0.1)
    assert hooks_on(model) > 0 and kept.recorder.attached


@pytest.mark.parametrize("shape", [(0, 10), (0, 4, 10)], ids=["2d", "3d"])
def test_an_empty_batch_gives_empty_results_with_or_without_extra_dimensions(shape):
    """Item 17: (0, 4, 10) is treated like (0, 10): empty per-example gradients and norms."""
    model = nn.Linear(10, 12)
    with PerExampleGradients(model) as pe:
        model(torch.randn(*shape)).sum().backward()
    assert pe.grads["weight"].shape == (0, 12, 10) and pe.grads["bias"].shape == (0, 12)
    for source in (pe.grads, recorded_factors(pe)):  # the statistics refuse both alike
        with pytest.raises(ValueError, match=r"the batch is empty \(n = 0\)"):
            gradient_norms(source)


def test_messages_name_the_root_module_plainly():
    """Item 19: no "Linear the model itself got ..."."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^the model itself \(Linear\) got an input of shape"):
        with PerExampleGradients(model):
            model(torch.randn(3))


def test_a_compiled_forward_gets_a_message_that_says_why_nothing_was_recorded():
    """Item 23: hooks do not run inside a model compiled before the recorder attached."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(5, 3)
    compiled(x).sum().backward()
    with PerExampleGradients(model) as pe:
        compiled(x).sum().backward()
        if pe.batch_size is None:  # the hooks did not run inside the compiled graph
            with pytest.raises(RuntimeError, match="torch.compile"):
                _ = pe.grads
        else:  # a torch that re-traces with the hooks: the results must then be right
            want = torch_func_per_example_grads(model, lambda out, _: out.sum(), x, x)
            for got, expected in zip(pe.grads.values(), want):
                torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_a_parameter_used_outside_its_module_is_refused_not_partial(which, dtype):
    """Item 1: the recorded calls account for part of the gradient only: refuse, naming it."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).to(dtype)

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            extra = x @ layer.weight.T if which == "weight" else layer.bias * x
            return torch.tanh(self.layer(x)) + extra

    model = Outside()
    x = torch.randn(6, 4, dtype=dtype)
    with PerExampleGradients(model) as pe:
        model(x).square().sum().backward()
    with pytest.raises(ValueError, match=rf"'layer.{which}' do not add up.*Linear 'layer'"):
        _ = pe.grads
    with pytest.raises(ValueError, match="do not add up"):
        recorded_factors(pe)


def test_a_conv_weight_used_outside_its_module_is_refused():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2).double()

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) + nn.functional.conv2d(x, conv.weight, padding=1, groups=2)

    model = Outside()
    with PerExampleGradients(model) as pe:
        model(torch.randn(3, 2, 5, 5, dtype=torch.float64)).square().sum().backward()
    with pytest.raises(ValueError, match=r"'conv.weight' do not add up"):
        _ = pe.grads


def _constant_rows(n: int) -> torch.Tensor:
    # every position's features equal: LayerNorm standardizes each row to exactly 0
    return torch.randn(n, 5, 1, dtype=torch.float64).expand(n, 5, 3).contiguous()


def _equal_pairs(n: int) -> torch.Tensor:
    # (n, 4, 1, 1) with channels 0, 1 and 2, 3 equal: a GroupNorm of 2 groups standardizes to 0
    return torch.randn(n, 2, 1, 1, dtype=torch.float64).repeat_interleave(2, dim=1)


@pytest.mark.parametrize(
    "norm, inputs",
    [
        (lambda: nn.LayerNorm(1), lambda n: torch.randn(n, 5, 1, dtype=torch.float64)),
        (lambda: nn.LayerNorm(3), _constant_rows),
        (lambda: nn.GroupNorm(2, 4), _equal_pairs),
    ],
    ids=["layernorm_one_feature", "layernorm_equal_features", "groupnorm_equal_groups"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_norm_whose_standardized_input_is_zero_is_not_refused(norm, inputs, dtype):
    # its weight gradient is exactly 0 and autograd's rounding noise (about 1e-14 in float64):
    # the two noises differ by a relative 1, and before the rounding-level floor that was
    # refused as a parameter used outside its module
    torch.manual_seed(0)
    model = nn.Sequential(norm(), nn.Flatten(), nn.LazyLinear(2)).to(dtype)
    x = inputs(3).to(dtype)
    model(x)  # materializes the lazy layer
    with PerExampleGradients(model) as pe:
        model(x).square().sum().backward()
        grads = pe.grads
    expected = torch_func_per_example_grads(model, lambda p, t: p.square().sum(), x, x)
    # the standardized inputs are 0 up to rounding (about 300 eps), which differs between the
    # batch forward and torch.func's one-example forwards: the layer after sees that noise
    tolerance = TOLERANCES[dtype] if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for got, want in zip(grads.values(), expected):
        torch.testing.assert_close(got, want, **tolerance)


def test_ordinary_models_pass_the_accounting_check_under_autocast_and_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    with PerExampleGradients(model, loss_reduction="mean") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        nn.functional.mse_loss(out.float(), y).backward()
    assert set(pe.grads) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_evaluation_forwards_with_gradients_on_do_not_hold_their_inputs():
    """Item 16: a forward nobody differentiates frees its input with its graph."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    for _ in range(50):
        x = torch.randn(64, 3)
        model(x)  # an evaluation without torch.no_grad(): the output is dropped
    gc.collect()
    record = optimizer.recorder.layers["0"]
    assert record.num_calls == 50 and all(a is None for a in record.inputs)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    optimizer.clear()
    nn.functional.mse_loss(model(x), y).backward()
    assert record.inputs[0] is x  # kept once its backward arrived
    optimizer.step()



def test_the_accounting_check_runs_on_the_first_batches_and_then_every_tenth():
    """The check costs a few small products per layer, so after the first batches it samples."""
    from goodfellow import hooks

    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    outside = {"on": False}

    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            extra = x @ layer.weight.T if outside["on"] else 0.0
            return self.layer(x) + extra

    model = Sometimes()
    pe = PerExampleGradients(model).attach()
    for batch in range(1, 2 * hooks.CHECK_EVERY + 1):
        outside["on"] = batch == hooks.CHECK_EVERY
        model(torch.randn(4, 3, dtype=torch.float64)).square().sum().backward()
        if batch == hooks.CHECK_EVERY:
            with pytest.raises(ValueError, match="do not add up"):
                _ = pe.grads
        else:
            _ = pe.grads
    pe.detach()
