"""The convolution rule against torch.func, the materialized statistics and explicit KFAC factors.

Every setting of the case list (dimension, stride, dilation, padding including "same" and
"valid", all four padding modes, groups including depthwise, bias or not) is a small CNN run
through PerExampleGradients and through ``vmap(grad(...))`` of one example's loss, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from goodfellow import (
    PerExampleGradients,
    clipped_mean,
    gradient_mean,
    gradient_norms,
    gradient_second_moment,
    gradient_variance,
    gradient_variance_trace,
    kfac_factors,
    recorded_factors,
    torch_func_per_example_grads,
)
from goodfellow.layers import conv as conv_rule
from goodfellow.layers import position_norms
from goodfellow.layers.conv import unfold_patches
from goodfellow.layers.routes import forced
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class ConvCase:
    name: str
    dim: int = 2
    c_in: int = 4
    c_out: int = 6
    kernel: int | tuple = 3
    size: int = 7
    kwargs: dict = field(default_factory=dict)
    batch: int = 3

    def make(self, dtype=torch.float64):
        conv = CONVS[self.dim](self.c_in, self.c_out, self.kernel, **self.kwargs)
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).to(dtype)
        x = torch.randn(self.batch, self.c_in, *[self.size] * self.dim, dtype=dtype)
        model(x)  # initialize the lazy head
        return model, x, torch.randn(self.batch, 2, dtype=dtype)


CASES = [
    ConvCase("2d-plain"),
    ConvCase("2d-no-bias", kwargs={"bias": False}),
    ConvCase("2d-stride-2", kwargs={"stride": 2}),
    ConvCase("2d-stride-tuple", kwargs={"stride": (2, 1)}),
    ConvCase("2d-dilation-2", kwargs={"dilation": 2}),
    ConvCase("2d-padding-1", kwargs={"padding": 1}),
    ConvCase("2d-padding-tuple", kwargs={"padding": (2, 0)}),
    ConvCase("2d-same", kwargs={"padding": "same"}),
    ConvCase("2d-same-even-kernel", kernel=4, kwargs={"padding": "same"}),
    ConvCase("2d-same-dilated", kwargs={"padding": "same", "dilation": 2}),
    ConvCase("2d-valid", kwargs={"padding": "valid"}),
    ConvCase("2d-reflect", kwargs={"padding": 1, "padding_mode": "reflect"}),
    ConvCase("2d-replicate", kwargs={"padding": 2, "padding_mode": "replicate"}),
    ConvCase("2d-circular", kwargs={"padding": 1, "padding_mode": "circular"}),
    ConvCase("2d-circular-same", kernel=4, kwargs={"padding": "same", "padding_mode": "circular"}),
    ConvCase("2d-groups-2", kwargs={"groups": 2}),
    ConvCase("2d-depthwise", c_out=8, kwargs={"groups": 4}),
    ConvCase("2d-groups-reflect", kwargs={"groups": 2, "padding": 1, "padding_mode": "reflect"}),
    ConvCase("2d-rect-kernel", kernel=(3, 2), kwargs={"stride": (1, 2), "dilation": (2, 1)}),
    ConvCase("2d-one-example", batch=1),
    ConvCase("1d-plain", dim=1, size=9),
    ConvCase("1d-stride-dilation", dim=1, size=11, kwargs={"stride": 2, "dilation": 2}),
    ConvCase("1d-circular-groups", dim=1, size=9,
             kwargs={"padding": 2, "padding_mode": "circular", "groups": 2}),  # fmt: skip
    ConvCase("1d-same", dim=1, size=8, kernel=4, kwargs={"padding": "same"}),
    ConvCase("3d-plain", dim=3, c_in=2, c_out=3, size=5),
    ConvCase("3d-replicate-stride", dim=3, c_in=2, c_out=4, size=5,
             kwargs={"padding": 1, "padding_mode": "replicate", "stride": 2}),  # fmt: skip
    ConvCase("3d-depthwise-same", dim=3, c_in=2, c_out=2, size=4,
             kwargs={"groups": 2, "padding": "same"}),  # fmt: skip
]
REDUCTIONS = ["sum", "mean"]
ROUTES = ["unfold", "unfold-one-example-per-chunk", "grouped", "grouped-chunks",
          "grouped-one-example-per-chunk"]


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """Each exact route of a conv's per-example weight gradient, forced (see layers.routes)."""
    name = request.param
    if name == "unfold-one-example-per-chunk":
        monkeypatch.setattr(conv_rule, "_CHUNK_BYTES", 1)
        name = "unfold"
    if name == "grouped-one-example-per-chunk":
        monkeypatch.setattr(conv_rule, "_GROUPED_CHUNK_BYTES", 1)
        name = "grouped-chunks"
    with forced(name):
        yield request.param


def loss_fn(reduction):
    return nn.MSELoss(reduction=reduction)


def reference(model, x, y, reduction):
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, torch_func_per_example_grads(model, loss_fn(reduction), x, y)))


def record(model, x, y, reduction) -> PerExampleGradients:
    with PerExampleGradients(model, loss_reduction=reduction) as pe:
        loss_fn(reduction)(model(x), y).backward()
    return pe


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_matches_torch_func(case, reduction, route):
    model, x, y = case.make()
    pe = record(model, x, y, reduction)
    want = reference(model, x, y, reduction)
    assert list(pe.grads) == list(want)
    for name, expected in want.items():
        torch.testing.assert_close(pe.grads[name], expected, **F64, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unfold_reproduces_the_convolution(case):
    """The patches times the flattened weight are the convolution's output, position by position."""
    model, x, _ = case.make()
    conv = model[0]
    patches = unfold_patches(x, conv)  # (n, L, C_in K)
    g = conv.groups
    n, positions = patches.shape[:2]
    w = conv.weight.reshape(g, conv.out_channels // g, -1)  # (g, o, i)
    out = torch.einsum("ntgi,goi->ntgo", patches.reshape(n, positions, g, -1), w)
    out = out.reshape(n, positions, -1)
    if conv.bias is not None:
        out = out + conv.bias
    expected = conv(x).flatten(2).transpose(1, 2)  # (n, L, C_out)
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.parametrize("chunk_bytes", [1, 250, 10**9], ids=["row", "two-rows", "whole"])
def test_squares_summed_in_pieces_equal_the_norms(chunk_bytes, monkeypatch):
    """The formed route's squares in pieces of rows: the norms of torch.func's gradients."""
    monkeypatch.setattr(position_norms, "_SQUARES_CHUNK_BYTES", chunk_bytes)
    g = torch.randn(7, 3, 5, dtype=torch.float64)  # 120 bytes per row: pieces of 1, 2, 7
    want = torch.einsum("noi,noi->n", g, g)
    torch.testing.assert_close(position_norms.sum_of_squares(g), want, rtol=1e-13, atol=0)
    # 49 positions, 18 inputs and 3 outputs per group: the conv's norms take the formed route
    model, x, y = next(c for c in CASES if c.name == "2d-groups-reflect").make()
    pe = record(model, x, y, "sum")
    grads = reference(model, x, y, "sum").values()
    expected = torch.cat([t.flatten(1) for t in grads], dim=1).norm(dim=1)  # (n,)
    torch.testing.assert_close(gradient_norms(recorded_factors(pe)), expected, **F64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_factored_statistics_equal_the_materialized_ones(case, route):
    model, x, y = case.make()
    pe = record(model, x, y, "mean")
    factored, materialized = recorded_factors(pe), pe.grads
    torch.testing.assert_close(gradient_norms(factored), gradient_norms(materialized), **F64)
    for statistic in (
        gradient_mean,
        gradient_second_moment,
        gradient_variance,
        lambda s: clipped_mean(s, 0.3),
    ):
        got, want = statistic(factored), statistic(materialized)
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **F64, msg=key)
    torch.testing.assert_close(
        gradient_variance_trace(factored), gradient_variance_trace(materialized), **F64
    )


def test_per_example_gradients_add_up_to_autograds_gradient():
    model, x, y = ConvCase("groups", kwargs={"groups": 2, "padding": 1}).make()
    pe = record(model, x, y, "sum")
    for name, p in model.named_parameters():
        torch.testing.assert_close(pe.grads[name].sum(0), p.grad, **F64, msg=name)


def test_kfac_factors_of_a_conv_are_those_of_its_unfolded_patches():
    """KFC: A from every patch (with a 1 for the bias), G from every position's delta."""
    model, x, y = ConvCase("kfc", kwargs={"padding": 1, "padding_mode": "reflect"}).make()
    pe = record(model, x, y, "mean")
    a, delta = recorded_factors(pe)["0"].kronecker_factors()
    conv = model[0]
    patches = unfold_patches(x, conv)  # (n, L, C_in K), explicitly
    ones = torch.ones(*patches.shape[:2], 1, dtype=x.dtype)
    torch.testing.assert_close(a, torch.cat([patches, ones], dim=-1), **F64)
    record_ = pe.layers["0"]
    expected_delta = (record_.grad_outputs[0] * x.shape[0]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(delta, expected_delta, **F64)
    A, G = kfac_factors(a, delta)
    n, positions = a.shape[:2]
    flat_a = a.reshape(-1, a.shape[-1])
    torch.testing.assert_close(A, flat_a.T @ flat_a / (n * positions), **F64)
    summed = delta.reshape(n * positions, -1)
    assert G.shape == (summed.shape[1], summed.shape[1])


def test_grouped_conv_has_no_single_kronecker_product():
    model, x, y = ConvCase("g", kwargs={"groups": 2}).make()
    pe = record(model, x, y, "sum")
    assert recorded_factors(pe)["0"].kronecker_factors() is None


def test_peers_error_zero_padding_instead_of_reflect_is_large():
    """Treating reflect padding as zeros (what the peers do) changes the gradient: the rule
    pads as the module does."""
    model, x, y = ConvCase("reflect", kwargs={"padding": 1, "padding_mode": "reflect"}).make()
    pe = record(model, x, y, "sum")
    conv = model[0]
    zeros = nn.Conv2d(4, 6, 3, padding=1).double()
    zeros.load_state_dict(conv.state_dict())
    wrong = unfold_patches(x, zeros)
    right = unfold_patches(x, conv)
    assert (wrong - right).abs().max() > 0.1
    want = reference(model, x, y, "sum")["0.weight"]
    torch.testing.assert_close(pe.grads["0.weight"], want, **F64)


def test_frozen_conv_weight_with_trained_bias():
    model, x, y = ConvCase("frozen").make()
    model[0].weight.requires_grad_(False)
    pe = record(model, x, y, "mean")
    want = reference(model, x, y, "mean")
    assert "0.weight" not in pe.grads
    torch.testing.assert_close(pe.grads["0.bias"], want["0.bias"], **F64)


def test_conv_called_twice_adds_both_calls(route):
    conv = nn.Conv2d(2, 2, 3, padding=1).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(torch.tanh(self.conv(x))).flatten(1)

    model = Twice()
    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    pe = record(model, x, y, "sum")
    want = reference(model, x, y, "sum")
    for name in want:
        torch.testing.assert_close(pe.grads[name], want[name], **F64, msg=name)


def test_float32_within_the_stated_tolerance():
    model, x, y = ConvCase("f32", kwargs={"groups": 2, "padding": "same"}).make(torch.float32)
    pe = record(model, x, y, "mean")
    want = reference(model, x, y, "mean")
    for name in want:
        torch.testing.assert_close(pe.grads[name], want[name], **TOLERANCES[torch.float32])


@given(
    dim=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_convolutions(dim, kernel, stride, dilation, padding, mode, groups,
                                      bias, seed):  # fmt: skip
    torch.manual_seed(seed)
    if mode in ("reflect", "circular"):
        padding = min(padding, 2)
    kwargs = dict(stride=stride, dilation=dilation, padding=padding, padding_mode=mode,
                  groups=groups, bias=bias)  # fmt: skip
    case = ConvCase("random", dim=dim, c_in=2, c_out=4, kernel=kernel, size=6, kwargs=kwargs)
    model, x, y = case.make()
    pe = record(model, x, y, "sum")
    want = reference(model, x, y, "sum")
    for name in want:
        torch.testing.assert_close(pe.grads[name], want[name], **F64, msg=name)
    torch.testing.assert_close(
        gradient_norms(recorded_factors(pe)), gradient_norms(pe.grads), **F64
    )


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 5, 5), r"Conv2d '0'.*no batch"),
        (nn.Sequential(nn.Conv1d(1, 2, 3)), torch.randn(1, 5), r"Conv1d '0'.*no batch"),
    ],
    ids=["unbatched-2d", "unbatched-1d"],
)
def test_refusals(model, x, message):
    with pytest.raises(ValueError, match=message):
        with PerExampleGradients(model):
            if x is not None:
                model(x).sum().backward()


@pytest.mark.parametrize("mode", ["ekfac", "kfac"])
def test_ekfac_step_of_a_conv_uses_the_factors_of_its_patches(mode):
    """One EKFAC/KFAC step on a CNN equals the preconditioned gradient built by hand from the
    unfolded patches (KFC), layer by layer; a grouped convolution gets a plain SGD step."""
    from goodfellow import (
        EKFAC,
        ekfac_scalings,
        join_weight_bias,
        kfac_scalings,
        kronecker_eigenbasis,
        precondition,
    )

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(36, 2),
    ).double()
    x, y = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    lr, damping = 0.1, 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = EKFAC(model, lr=lr, damping=damping, update_freq=1, decay=0.0, mode=mode)
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    conv = model[0]
    a = unfold_patches(x, conv)  # (n, L, C_in K)
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=-1)
    delta = (optimizer.recorder.layers["0"].grad_outputs[0] * x.shape[0]).flatten(2)
    delta = delta.transpose(1, 2)  # (n, L, C_out)
    basis = kronecker_eigenbasis(*kfac_factors(a, delta))
    scalings = ekfac_scalings(a, delta, basis) if mode == "ekfac" else kfac_scalings(basis)
    grad = join_weight_bias(grads[0].flatten(1), grads[1])
    expected = precondition(grad, basis, scalings, damping)
    optimizer.step()
    params = list(model.parameters())
    torch.testing.assert_close(
        params[0], before[0] - lr * expected[:, :-1].reshape(conv.weight.shape), **F64
    )
    torch.testing.assert_close(params[1], before[1] - lr * expected[:, -1], **F64)
    # the grouped conv has no single Kronecker product: plain gradient descent
    torch.testing.assert_close(params[2], before[2] - lr * grads[2], **F64)
    torch.testing.assert_close(params[3], before[3] - lr * grads[3], **F64)
