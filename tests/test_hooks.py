"""PerExampleGradients against torch.func, autograd's batch gradient and analytic formulas.

Settings are a case list in the BackPACK style (model, input shape, loss, reduction, dtype);
every case is run through the hooks and through ``vmap(grad(...))`` of one example's loss.
"""

from __future__ import annotations

import gc
import resource
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from goodfellow import (
    MLP,
    LayerRecord,
    PerExampleGradients,
    _assembly,
    goodfellow_backprop,
    torch_func_per_example_grads,
)
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]

# ----------------------------------------------------------------------------- models


class ResidualShared(nn.Module):
    """A module tree (not a Sequential): a residual, one Linear used twice, an inplace ReLU."""

    def __init__(self, d_in: int = 4, width: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.block = nn.ModuleDict({"shared": nn.Linear(width, width), "act": nn.ReLU(True)})
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.block["act"](self.embed(x))  # in-place on the Linear's output
        h = h + torch.tanh(self.block["shared"](h))  # residual
        h = h + torch.tanh(self.block["shared"](h))  # the same Linear, second call
        return self.head(h)


class SequenceModel(nn.Module):
    """Inputs of shape (n, T, d): position-wise Linear layers, mean over positions at the end."""

    def __init__(self, d_in: int = 3, width: int = 6, d_out: int = 4, pool: bool = True):
        super().__init__()
        self.inner = nn.Linear(d_in, width)
        self.act = nn.ReLU(inplace=True)
        self.outer = nn.Linear(width, d_out)
        self.pool = pool

    def forward(self, x):
        y = self.outer(self.act(self.inner(x)))  # (n, T, d_out)
        return y.mean(1) if self.pool else y


class TiedDeadBranch(nn.Module):
    """Two Linear modules sharing one weight, plus a Linear whose output never reaches the loss
    and one that is never called: their per-example gradients are zero."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.second.weight = self.first.weight
        self.dead = nn.Linear(width, 2)
        self.unused = nn.Linear(width, 2)
        self.norm = nn.LayerNorm(width)
        self.norm.requires_grad_(False)  # frozen non-Linear parameters are allowed

    def forward(self, x):
        h = torch.tanh(self.first(x))
        _ = self.dead(h)
        return self.second(self.norm(h))


class FourDimensional(nn.Module):
    """Inputs (n, A, B, d) and an in-place op on a slice of a Linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 5, bias=True)
        self.out = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        z = self.lin(x)  # (n, A, B, 5)
        z[..., :2].mul_(3.0)
        return self.out(torch.sigmoid(z)).sum((1, 2))  # (n, 2)


def sequential_mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def no_bias_mlp():
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Sigmoid(), nn.Linear(5, 3, bias=False))


@dataclass(frozen=True)
class Case:
    """One setting: a model, the shape of one example's input, a loss and its reduction."""

    name: str
    make_model: Callable[[], nn.Module]
    example_shape: tuple[int, ...]
    loss: str  # "mse" or "cross_entropy"
    out_shape: tuple[int, ...]
    batch: int = 5

    def make(self, reduction: str, dtype: torch.dtype, seed: int = 0):
        torch.manual_seed(seed)
        model = self.make_model().to(dtype)
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(self.batch, *self.example_shape, generator=generator, dtype=dtype)
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.out_shape[-1], (self.batch,), generator=generator)
            loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        else:
            y = torch.randn(self.batch, *self.out_shape, generator=generator, dtype=dtype)
            loss_fn = nn.MSELoss(reduction=reduction)
        return model, x, y, loss_fn


CASES = [
    Case("sequential", sequential_mlp, (4,), "cross_entropy", (3,)),
    Case("sequential-n1", sequential_mlp, (4,), "mse", (3,), batch=1),
    Case("no-bias", no_bias_mlp, (4,), "mse", (3,)),
    Case("residual-shared", ResidualShared, (4,), "cross_entropy", (3,)),
    Case("sequence-pooled", SequenceModel, (7, 3), "cross_entropy", (4,)),
    Case("sequence-per-position", lambda: SequenceModel(pool=False), (7, 3), "mse", (7, 4)),
    Case("tied-dead-unused", TiedDeadBranch, (4,), "mse", (4,)),
    Case("four-dimensional", FourDimensional, (2, 3, 3), "mse", (2,)),
    Case("root-is-linear", lambda: nn.Linear(3, 2), (3,), "mse", (2,)),
    Case("goodfellow-mlp", lambda: MLP(4, [5, 5], 3), (4,), "cross_entropy", (3,)),
]
REDUCTIONS = ["sum", "mean"]
DTYPES = [torch.float64, torch.float32]


def prediction(output):
    """The prediction of a model that may return (y, activations, linear_combs)."""
    return output[0] if isinstance(output, tuple) else output


def record(model, x, y, loss_fn, reduction, **kwargs) -> PerExampleGradients:
    """The user's code: an ordinary forward and backward inside the context."""
    with PerExampleGradients(model, loss_reduction=reduction, **kwargs) as pe:
        loss_fn(prediction(model(x)), y).backward()
    return pe


def reference(model, x, y, loss_fn) -> dict[str, torch.Tensor]:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))


def hook_counts(model: nn.Module) -> list[int]:
    """How many hooks of each kind every module holds."""
    kinds = ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"]
    return [len(getattr(m, kind)) for m in model.modules() for kind in kinds]


def hook_free(model: nn.Module) -> bool:
    return not any(hook_counts(model))


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_torch_func(case, reduction, dtype):
    model, x, y, loss_fn = case.make(reduction, dtype)
    pe = record(model, x, y, loss_fn, reduction)
    want = reference(model, x, y, loss_fn)
    assert list(pe.grads) == list(want)  # every Linear parameter, in named_parameters order
    for name, expected in want.items():
        got = pe.grads[name]
        assert got.shape == (case.batch, *dict(model.named_parameters())[name].shape)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sum_or_mean_is_autograds_batch_gradient(case, reduction):
    model, x, y, loss_fn = case.make(reduction, torch.float64)
    pe = record(model, x, y, loss_fn, reduction)
    combine = torch.sum if reduction == "sum" else torch.mean
    params = dict(model.named_parameters())
    for name, per_example in pe.grads.items():
        batch_grad = params[name].grad  # None for a parameter the loss does not depend on
        expected = torch.zeros_like(params[name]) if batch_grad is None else batch_grad
        torch.testing.assert_close(combine(per_example, 0), expected, **F64, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_same_numbers_as_goodfellow_backprop(reduction):
    """The hooks and the MLP's own route share batched_outer: bit-for-bit the same result."""
    model, x, y, loss_fn = CASES[-1].make(reduction, torch.float64)
    pe = record(model, x, y, loss_fn, reduction)
    y_hat, activations, linear_combs = model(x)
    loss = loss_fn(y_hat, y)
    linear_grads = torch.autograd.grad(loss, linear_combs)
    expected = goodfellow_backprop(activations, linear_grads, reduction)
    for got, want in zip(pe.grads.values(), expected):
        assert torch.equal(got, want)


@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    batch=st.integers(1, 6),
    positions=st.sampled_from([(), (1,), (3,), (2, 2)]),
    bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_models(widths, batch, positions, bias, reduction, inplace, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out, bias=bias), nn.ReLU(inplace=inplace)]
    model = nn.Sequential(*layers[:-1]).double()
    x = torch.randn(batch, *positions, widths[0], dtype=torch.float64)
    y = torch.randn(batch, *positions, widths[-1], dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    pe = record(model, x, y, loss_fn, reduction)
    for name, expected in reference(model, x, y, loss_fn).items():
        torch.testing.assert_close(pe.grads[name], expected, **F64, msg=name)


def test_linear_applied_twice_adds_both_calls():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with PerExampleGradients(lin) as pe:
        first = lin(x)
        second = lin(torch.tanh(first))
        second.square().sum().backward()
    calls = pe.layers[""]
    assert calls.num_calls == 2
    contributions = [
        torch.einsum("no,ni->noi", g, a) for g, a in zip(calls.grad_outputs, calls.inputs)
    ]
    torch.testing.assert_close(pe.grads["weight"], contributions[0] + contributions[1], **F64)
    torch.testing.assert_close(pe.grads["bias"], sum(calls.grad_outputs), **F64)


@pytest.mark.parametrize("shape", [(6, 4), (6, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("where", ["module", "function", "slice"])
def test_inplace_after_linear(shape, where):
    """In-place ops on a Linear's output must not hide its gradient (also for 3-d views)."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(4, 5), nn.Linear(5, 2), nn.ReLU(inplace=True)

        def forward(self, x):
            z = self.a(x)
            if where == "module":
                z = self.relu(z)
            elif where == "function":
                z = torch.nn.functional.leaky_relu(z, 0.1, inplace=True)
            else:
                z[..., 1:3].tanh_()
            return self.b(z)

    model = Model().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    pe = record(model, x, y, loss_fn, "sum")
    assert all(g is not None for g in pe.layers["a"].grad_outputs)
    for name, expected in reference(model, x, y, loss_fn).items():
        torch.testing.assert_close(pe.grads[name], expected, **F64, msg=name)


def penalty_gradient(model, x, y, loss_fn) -> dict[str, torch.Tensor]:
    """torch.func's d/dθ of the penalty Σ_i ||g_i||², g_i one example's gradient of ``loss_fn``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    def penalty_of(p):
        per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(p, x, y)
        return sum(g.square().sum() for g in per_example.values())

    return grad(penalty_of)(params)


def test_create_graph_makes_the_result_differentiable():
    """d/dθ of Σ_i ||g_i||² through the hooks equals torch.func's (a second-order check)."""
    model, x, y, loss_fn = CASES[0].make("mean", torch.float64)
    with PerExampleGradients(model, "mean") as pe:
        loss = loss_fn(model(x), y)
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    penalty = sum(g.square().sum() for g in pe.grads.values())
    params = dict(model.named_parameters())
    got = torch.autograd.grad(penalty, list(params.values()))

    want = penalty_gradient(model, x, y, loss_fn)
    for name, g in zip(params, got):
        torch.testing.assert_close(g, want[name], **F64, msg=name)
    with pytest.raises(ValueError, match="create_graph"):
        pe.compute_grads(out={k: torch.empty_like(v) for k, v in pe.grads.items()})


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("first", ["backward", "autograd.grad"])
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=lambda c: c.name)
def test_second_order_while_attached(case, first):
    """A gradient-penalty step inside the context: the penalty's backward passes the recorded
    outputs again (d penalty/dZ, not the loss's gradient) and must neither raise nor record."""
    model, x, y, loss_fn = case.make("mean", torch.float64)
    params = dict(model.named_parameters())
    with PerExampleGradients(model, "mean") as pe:
        loss = loss_fn(model(x), y)
        if first == "backward":
            loss.backward(create_graph=True)
        else:
            torch.autograd.grad(loss, list(params.values()), create_graph=True)
        before = {k: v.detach().clone() for k, v in pe.grads.items()}
        penalty = sum(g.square().sum() for g in pe.grads.values())
        got = torch.autograd.grad(penalty, list(params.values()))
        for name, g in pe.compute_grads().items():  # the records still hold the loss's dL/dZ
            torch.testing.assert_close(g.detach(), before[name], rtol=0, atol=0)

    want = penalty_gradient(model, x, y, loss_fn)
    for name, g in zip(params, got):
        torch.testing.assert_close(g, want[name], **F64, msg=name)
    for p in params.values():
        p.grad = None  # backward(create_graph=True) ties each .grad to the graph


# ----------------------------------------------------------------------------- the recorded layers


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layer_records_hold_inputs_and_raw_grad_outputs(reduction):
    model, x, y, loss_fn = CASES[-1].make(reduction, torch.float64)  # goodfellow.MLP
    pe = record(model, x, y, loss_fn, reduction)
    _, activations, linear_combs = model(x)
    linear_grads = torch.autograd.grad(loss_fn(linear_combs[-1], y), linear_combs)
    assert list(pe.layers) == ["layers.0", "layers.1", "layers.2"]
    factor = x.shape[0] if reduction == "mean" else 1
    for layer, a, g in zip(pe.layers.values(), activations, linear_grads):
        assert isinstance(layer, LayerRecord)
        assert layer.module is model.get_submodule(layer.name)
        assert layer.num_calls == 1 and layer.batch_size == x.shape[0]
        assert layer.scale == factor
        torch.testing.assert_close(layer.inputs[0], a, **F64)
        torch.testing.assert_close(layer.grad_outputs[0], g, **F64)  # as autograd gives it
        torch.testing.assert_close(layer.per_example_grad_outputs[0], g * factor, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_linear_layer_analytic(reduction):
    """Seed 001's experiment: ŷ = W x, MSE (mean) or TSE (sum); δ_i = -2 (y_i - ŷ_i) either way."""
    torch.manual_seed(0)
    n = 10
    model = nn.Linear(2, 1, bias=False).double()
    x = torch.randn(n, 2, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    with PerExampleGradients(model, reduction) as pe:
        y_hat = model(x)
        nn.functional.mse_loss(y_hat, y, reduction=reduction).backward()
    residual = (y - y_hat).detach()
    batch_gradient = -2 * residual / (n if reduction == "mean" else 1)  # dL/dŷ_i, batch loss
    own_gradient = -2 * residual  # dL_i/dŷ_i
    record = pe.layers[""]
    torch.testing.assert_close(record.grad_outputs[0], batch_gradient, **F64)
    torch.testing.assert_close(record.per_example_grad_outputs[0], own_gradient, **F64)
    torch.testing.assert_close(pe.grads["weight"], (own_gradient * x)[:, None, :], **F64)
    # Σ_i h_i δ_iᵀ of the raw hook gradients is W.grad, whatever the reduction
    torch.testing.assert_close(record.grad_outputs[0].T @ x, model.weight.grad, **F64)


def test_unreached_call_has_zero_per_example_grad_outputs():
    model, x, y, loss_fn = CASES[6].make("sum", torch.float64)  # TiedDeadBranch
    pe = record(model, x, y, loss_fn, "sum")
    dead = pe.layers["dead"]
    assert dead.grad_outputs == [None]
    assert torch.equal(dead.per_example_grad_outputs[0], torch.zeros(x.shape[0], 2).double())
    assert pe.layers["unused"].num_calls == 0
    assert "second.weight" not in pe.grads  # the tied weight is named once, as by named_parameters
    assert torch.count_nonzero(pe.grads["dead.weight"]) == 0


def test_frozen_linear_parameters_are_left_out():
    model = sequential_mlp().double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(3, 4).double(), torch.randint(0, 3, (3,))
    pe = record(model, x, y, nn.CrossEntropyLoss(), "mean")
    assert "0.weight" not in pe.grads and "0.bias" in pe.grads
    for name, expected in reference(model, x, y, nn.CrossEntropyLoss()).items():
        torch.testing.assert_close(pe.grads[name], expected, **F64)


# ----------------------------------------------------------------------------- workspaces


def test_compute_grads_writes_into_out():
    model, x, y, loss_fn = CASES[3].make("mean", torch.float64)
    pe = record(model, x, y, loss_fn, "mean")
    workspace = {k: torch.full_like(v, float("nan")) for k, v in pe.grads.items()}
    result = pe.compute_grads(out=workspace)
    for name, tensor in result.items():
        assert tensor.data_ptr() == workspace[name].data_ptr()
        assert torch.equal(tensor, pe.grads[name])


def test_reuse_buffers_across_batches():
    model = SequenceModel().double()
    loss_fn = nn.CrossEntropyLoss()
    pe = PerExampleGradients(model, "mean", reuse_buffers=True).attach()
    pointers = None
    for step, n in enumerate([4, 4, 4, 6, 6]):
        x, y = torch.randn(n, 5, 3).double(), torch.randint(0, 4, (n,))
        loss_fn(model(x), y).backward()
        grads = pe.grads
        for name, expected in reference(model, x, y, loss_fn).items():
            torch.testing.assert_close(grads[name], expected, **F64)
        now = [t.data_ptr() for t in grads.values()]
        if step in (1, 2, 4):  # same batch size as the step before: the same memory
            assert now == pointers
        pointers = now
        model.zero_grad()
    pe.detach()


def test_out_buffers_may_be_views_of_one_flat_buffer_but_not_share_memory():
    model, x, y, loss_fn = CASES[0].make("sum", torch.float64)
    pe = record(model, x, y, loss_fn, "sum")
    sizes = [g.numel() for g in pe.grads.values()]
    chunks = torch.full((sum(sizes),), float("nan"), dtype=torch.float64).split(sizes)
    flat = {k: c.view(g.shape) for (k, g), c in zip(pe.grads.items(), chunks)}
    for name, tensor in pe.compute_grads(out=flat).items():
        assert torch.equal(tensor, pe.grads[name])
    shared = {k: torch.empty_like(v) for k, v in pe.grads.items()}
    shared["2.bias"] = shared["0.bias"]  # both (5, 6): the second write would win
    with pytest.raises(ValueError, match=r"out\['(0|2).bias'\] shares memory"):
        pe.compute_grads(out=shared)


def test_an_out_buffer_holding_a_recorded_input_is_refused():
    # the layer's input lives in its own weight buffer: writing the first example's gradient
    # would overwrite inputs of examples not yet written
    model = torch.nn.Linear(4, 4).double()
    buffer = torch.randn(3, 4, 4, dtype=torch.float64)
    x = buffer[:, 0, :]  # (3, 4), a view of the buffer
    with PerExampleGradients(model, loss_reduction="sum") as pe:
        model(x).square().sum().backward()
        out = {"weight": buffer, "bias": torch.empty(3, 4, dtype=torch.float64)}
        with pytest.raises(ValueError, match=r"out\['weight'\] shares memory .* recorded input"):
            pe.compute_grads(out=out)


def test_a_batch_made_from_the_kept_results_is_refused():
    # reuse_buffers=True writes the next batch into the previous results, which the recorder
    # checks once when it keeps them; an input made from them would be overwritten while read
    model = torch.nn.Linear(4, 4).double()
    with PerExampleGradients(model, loss_reduction="sum", reuse_buffers=True) as pe:
        model(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()
        kept = pe.grads["weight"]  # (3, 4, 4), the buffer of the next batch's weights
        model(kept[:, 0, :]).square().sum().backward()
        with pytest.raises(ValueError, match=r"out\['weight'\] shares memory .* recorded input"):
            pe.grads  # noqa: B018
        x = torch.randn(3, 4, dtype=torch.float64)  # a batch of its own goes into the buffers
        model(x).square().sum().backward()
        expected = reference(model, x, torch.zeros(3, 4, dtype=torch.float64), _square_sum)
        assert pe.grads["weight"].data_ptr() == kept.data_ptr()
        torch.testing.assert_close(pe.grads["weight"], expected["weight"], **F64)
        # handed back as out= for a batch of another size, the kept results are checked anew
        model(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
        with pytest.raises(ValueError, match=r"out\['weight'\] must be a .* of shape \(5, 4, 4\)"):
            pe.compute_grads(out=pe._workspace)


def _square_sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().sum()


@pytest.mark.parametrize("layout", ["transposed", "one tensor twice"])
def test_results_that_cannot_take_a_batch_are_not_kept(layout):
    model = torch.nn.Linear(4, 4).double()
    pe = record(model, torch.randn(3, 4).double(), torch.randn(3, 4).double(),
                nn.MSELoss(reduction="sum"), "sum")  # fmt: skip
    pe.reuse_buffers = True
    weight = torch.zeros(3, 4, 4, dtype=torch.float64)
    results = {
        "transposed": {"weight": weight.transpose(1, 2), "bias": torch.zeros(3, 4).double()},
        "one tensor twice": {"weight": weight, "bias": weight[:, 0]},
    }[layout]
    _assembly.keep_workspace(pe, results)
    assert pe._workspace is None
    _assembly.keep_workspace(pe, pe.compute_grads())  # fresh results are kept
    assert pe._workspace is not None


# ----------------------------------------------------------------------------- mixed precision


def naive_under_autocast(model, x, y, loss_fn):
    """The naive loop under CPU autocast: one example at a time, each parameter's own .grad."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x[i : i + 1])
        loss = loss_fn(output.float(), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, list(params.values())))
    return {name: torch.stack(column) for name, column in zip(params, zip(*rows))}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("example_shape", [(4,), (3, 4)], ids=["2d", "3d"])
def test_autocast_matches_the_naive_loop_under_autocast(example_shape, reduction):
    """The Linear ran in bfloat16 on its rounded input; results come in the parameter's dtype."""
    torch.manual_seed(0)
    model = sequential_mlp()
    x, y = torch.randn(6, *example_shape), torch.randn(6, *example_shape[:-1], 3)
    loss_fn = nn.MSELoss(reduction=reduction)
    expected = naive_under_autocast(model, x, y, loss_fn)
    pe = PerExampleGradients(model, reduction, reuse_buffers=True).attach()
    for _ in range(2):  # the second batch goes into the first one's buffers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss_fn(output.float(), y).backward()
        for name, want in expected.items():
            assert pe.grads[name].dtype == torch.float32
            if reduction == "sum":  # the same bfloat16 products: one rounding apart at most
                tolerance = {"rtol": 2**-8, "atol": 1e-6}
            else:  # the backward rounds dL/dZ / n (batch) and dL/dZ (alone) differently
                tolerance = {"rtol": 0.0, "atol": 2**-7 * want.abs().max().item()}
            torch.testing.assert_close(pe.grads[name], want, **tolerance, msg=name)
    pe.detach()


class OwnMatmul(nn.Module):
    """A custom layer (the fallback rule's) whose forward autocast runs in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def _attention_with_a_frozen_bias() -> nn.Module:
    """``nn.MultiheadAttention`` not every part of which trains: the rule reruns it by vmap."""
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    attention.out_proj.bias.requires_grad_(False)
    return nn.Sequential(nn.Linear(4, 4), SelfAttention(attention), nn.Linear(4, 3))


class SelfAttention(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Sequential(nn.Linear(4, 4), OwnMatmul()), _attention_with_a_frozen_bias],
    ids=["custom-layer", "attention-rerun"],
)
def test_a_rerun_module_computes_as_it_did_under_autocast(make):
    # the rule reruns the module from its recorded (bfloat16) inputs: under the call's autocast,
    # as the forward ran, and read inside another setting changes nothing
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(5, 2, 4), torch.randn(5, 2, 3)
    loss_fn = nn.MSELoss(reduction="sum")
    expected = naive_under_autocast(model, x, y, loss_fn)
    with PerExampleGradients(model, "sum") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss_fn(output.float(), y).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            grads = pe.grads
        for name, want in expected.items():
            assert grads[name].dtype == torch.float32
            tolerance = {"rtol": 0.0, "atol": 2**-7 * want.abs().max().item()}
            torch.testing.assert_close(grads[name], want, **tolerance, msg=name)
        model(x).square().sum().backward()  # outside autocast, read inside it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads = pe.grads
    expected = torch_func_per_example_grads(model, lambda out, _: out.square().sum(), x, y)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, want in zip(trained, expected):
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_calls_of_a_rerun_module_under_two_autocast_settings_are_refused():
    model = OwnMatmul()
    x = torch.randn(5, 4)
    with PerExampleGradients(model, "sum") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = model(x)
        (inside.float().sum() + model(x).sum()).backward()
        with pytest.raises(ValueError, match=r"different autocast settings.*same torch.autocast"):
            pe.grads  # noqa: B018


# ----------------------------------------------------------------------------- hooks and batches


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def _scale_output(module: nn.Module, args: tuple, output: object) -> object:
    """A user's forward hook that changes what the module returns (a mask, a scale)."""
    if isinstance(output, tuple):
        return (output[0] * 3.0, *output[1:])
    return output * 3.0


@pytest.mark.parametrize("when", ["before attach", "after attach"])
@pytest.mark.parametrize(
    "make",
    [lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), AttentionBlock],
    ids=["linear", "attention"],
)
def test_a_forward_hook_that_changes_the_output_leaves_the_gradients_right(make, when):
    # the recorder's hooks run before the user's, on the module's own output Z
    torch.manual_seed(0)
    model = make().double()
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention)))
    x, y = torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    pe = PerExampleGradients(model, "sum")
    if when == "before attach":
        first.register_forward_hook(_scale_output)
        pe.attach()
    else:
        pe.attach()
        first.register_forward_hook(_scale_output)
    expected = reference(model, x, y, loss_fn)  # torch.func runs the user's hook too
    loss_fn(model(x), y).backward()
    for name, want in expected.items():
        torch.testing.assert_close(pe.grads[name], want, **F64, msg=name)
    pe.detach()


def test_no_hook_remains_after_the_context():
    model = ResidualShared()
    with PerExampleGradients(model) as pe:
        assert not hook_free(model) and pe.attached
        model(torch.randn(2, 4)).sum().backward()
    assert hook_free(model) and not pe.attached
    pe.detach()  # idempotent
    assert hook_free(model)


def test_no_hook_remains_after_an_exception():
    model = ResidualShared()
    with pytest.raises(KeyError), PerExampleGradients(model):
        model(torch.randn(2, 4))
        raise KeyError("user code failed")
    assert hook_free(model)


def test_backward_after_detach_records_nothing():
    model = sequential_mlp()
    with PerExampleGradients(model) as pe:
        out = model(torch.randn(3, 4))
    out.sum().backward()
    with pytest.raises(RuntimeError, match="no backward"):
        _ = pe.grads


def test_fresh_results_every_batch():
    model = ResidualShared().double()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with PerExampleGradients(model, "sum") as pe:
        for n in [5, 3, 8]:
            x, y = torch.randn(n, 4).double(), torch.randint(0, 3, (n,))
            loss_fn(model(x), y).backward()
            assert pe.batch_size == n
            assert pe.layers["block.shared"].num_calls == 2  # not 4, 6: the old calls are gone
            for name, expected in reference(model, x, y, loss_fn).items():
                torch.testing.assert_close(pe.grads[name], expected, **F64)


def test_previous_batch_is_released():
    model = sequential_mlp()
    with PerExampleGradients(model) as pe:
        model(torch.randn(3, 4)).sum().backward()
        old_input = weakref.ref(pe.layers["0"].inputs[0])
        old_grads = weakref.ref(pe.grads["0.weight"])
        model(torch.randn(3, 4)).sum().backward()
        gc.collect()
        assert old_input() is None and old_grads() is None


def test_no_grad_forward_does_not_start_a_batch():
    model, x, y, loss_fn = CASES[0].make("mean", torch.float64)
    with PerExampleGradients(model, "mean") as pe:
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            model(torch.randn(9, 4).double())  # evaluation in between
        for name, expected in reference(model, x, y, loss_fn).items():
            torch.testing.assert_close(pe.grads[name], expected, **F64)


def test_layers_called_directly_still_start_new_batches():
    """A container whose forward is never called: a Linear run after a backward starts a batch."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 1)]).double()
    with PerExampleGradients(layers) as pe:
        for n in [2, 5]:
            x = torch.randn(n, 3).double()
            layers[1](torch.tanh(layers[0](x))).square().sum().backward()
            assert [r.num_calls for r in pe.layers.values()] == [1, 1]
            assert pe.grads["0.weight"].shape == (n, 4, 3)


def test_reattaching_keeps_the_record_objects():
    model = sequential_mlp()
    pe = PerExampleGradients(model).attach()
    first = pe.layers["2"]
    pe.detach()
    pe.attach()
    assert pe.layers["2"] is first and first.num_calls == 0
    pe.detach()


def test_memory_is_flat_over_a_long_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    # one batch's per-example gradients take 32 * 4810 floats = 0.6 MB: a leak of them, of the
    # records or of the hooks grows by that much per step
    pe = PerExampleGradients(model, "mean").attach()

    def step():
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in pe.grads.values()])
        optimizer.step()
        return norms

    def live_tensors():
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a busy machine
    try:
        for _ in range(20):
            step()
        tensors_before = live_tensors()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(1000):
            step()
        tensors_after = live_tensors()
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        torch.set_num_threads(threads)
    assert len(pe._tensor_handles) == 2  # this batch's hooks only
    pe.detach()
    assert tensors_after == tensors_before
    kib = 1 if sys.platform != "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    assert (peak_after - peak_before) / kib < 50 * 1024  # a leak would be 600 MB


# ----------------------------------------------------------------------------- bad input


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PerExampleGradients(lambda x: x)


@pytest.mark.parametrize("reduction", ["avg", "Mean", None, "none"])
def test_unknown_loss_reduction(reduction):
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        PerExampleGradients(sequential_mlp(), loss_reduction=reduction)


def test_reuse_buffers_must_be_bool():
    with pytest.raises(TypeError, match="reuse_buffers"):
        PerExampleGradients(sequential_mlp(), reuse_buffers="yes")


class WithParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


class LinearWithOwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class LinearWithExtraParameter(nn.Linear):
    def __init__(self):
        super().__init__(3, 3)
        self.gain = nn.Parameter(torch.ones(3))


REFUSED = [
    (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        r"module '1' \(BatchNorm1d\).*every other example.*undefined",
    ),
    (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)),  # no parameters at all
        r"module '1' \(BatchNorm1d\).*training mode",
    ),
    (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval(),
        r"module '1' \(BatchNorm1d\).*trainable",
    ),
    (nn.Sequential(LinearWithOwnForward(3, 3)), r"'0' \(LinearWithOwnForward\).*own forward"),
    (nn.Sequential(LinearWithExtraParameter()), r"'0' \(LinearWithExtraParameter\).*\['gain'\]"),
    (nn.Sequential(nn.LazyLinear(3)), r"'0' \(LazyLinear\).*uninitialized"),
    (nn.Sequential(nn.ReLU(), nn.Tanh()), r"no nn.Linear layer"),
]


REFUSED_IDS = [
    "batchnorm-train",
    "batchnorm-no-affine",
    "batchnorm-eval-trainable",
    "linear-own-forward",
    "linear-extra-parameter",
    "lazy-linear",
    "no-linear",
]


# Once refused for want of a rule; now claimed by the embedding, norm and fallback rules.
FORMERLY_REFUSED = {
    "conv-transpose": lambda: (
        nn.Sequential(nn.ConvTranspose1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 1)),
        torch.randn(4, 1, 6),
    ),
    "embedding": lambda: (
        nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 1)),
        torch.randint(0, 5, (4, 2)),
    ),
    "layernorm": lambda: (
        nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 1)),
        torch.randn(4, 3),
    ),
    "bare-parameter": lambda: (nn.Sequential(WithParameter(), nn.Linear(3, 1)), torch.randn(4, 3)),
}


@pytest.mark.parametrize("case", list(FORMERLY_REFUSED))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_layers_without_linear_rule_give_torch_func_results(case, reduction):
    torch.manual_seed(0)
    model, x = FORMERLY_REFUSED[case]()
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randn(x.shape[0], 1, dtype=torch.float64)
    pe = record(model, x, y, nn.MSELoss(reduction=reduction), reduction)
    expected = reference(model, x, y, nn.MSELoss(reduction=reduction))
    assert list(pe.grads) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(pe.grads[name], value, **F64)


@pytest.mark.parametrize(("model", "message"), REFUSED, ids=REFUSED_IDS)
def test_unsupported_modules_are_refused_on_enter(model, message):
    before = hook_counts(model)  # LazyLinear has a hook of its own
    pe = PerExampleGradients(model)  # construction is fine: the model is checked on entry
    with pytest.raises(ValueError, match=message), pe:
        pass
    assert hook_counts(model) == before and not pe.attached


def test_frozen_batchnorm_in_eval_is_allowed_until_it_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    model[1].requires_grad_(False)
    model.eval()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 1).double()
    pe = record(model, x, y, nn.MSELoss(), "mean")
    for name, expected in reference(model, x, y, nn.MSELoss()).items():
        torch.testing.assert_close(pe.grads[name], expected, **F64)
    with PerExampleGradients(model) as pe:
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            model(x)


def test_grads_before_any_forward():
    with PerExampleGradients(sequential_mlp()) as pe:
        with pytest.raises(RuntimeError, match="nothing recorded"):
            _ = pe.grads
        with pytest.raises(RuntimeError, match="nothing recorded"):
            pe.compute_grads()


def test_grads_before_backward():
    model = sequential_mlp()
    with PerExampleGradients(model) as pe:
        model(torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="no backward"):
            _ = pe.grads
        with pytest.raises(RuntimeError, match="no backward"):
            _ = pe.layers["0"].per_example_grad_outputs


def test_scale_before_a_call():
    pe = PerExampleGradients(sequential_mlp()).attach()
    with pytest.raises(RuntimeError, match="has not run"):
        _ = pe.layers["0"].scale
    pe.detach()


def test_second_backward_through_the_same_forward():
    model = sequential_mlp()
    with PerExampleGradients(model):
        loss = model(torch.randn(3, 4)).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward went through the same forward"):
            loss.backward()


def test_backward_through_an_earlier_batch():
    model = sequential_mlp()
    with PerExampleGradients(model) as pe:
        stale = model(torch.randn(3, 4)).sum()
        stale.backward(retain_graph=True)
        model(torch.randn(3, 4))  # the first forward after a backward starts a new batch
        with pytest.raises(RuntimeError, match="from an earlier batch"):
            stale.backward()
        stale = model(torch.randn(3, 4)).sum()
        pe.clear()
        with pytest.raises(RuntimeError, match="from an earlier batch"):
            stale.backward()


def test_forward_with_gradients_but_no_backward_of_another_size():
    model = sequential_mlp()
    with PerExampleGradients(model) as pe:
        model(torch.randn(3, 4))  # e.g. evaluation without torch.no_grad()
        with pytest.raises(ValueError, match="'0' got 5 examples.*got 3.*torch.no_grad"):
            model(torch.randn(5, 4))
        pe.clear()
        model(torch.randn(5, 4)).sum().backward()
        assert pe.grads["0.weight"].shape == (5, 6, 4)


def test_forward_whose_output_is_discarded_contributes_zero():
    model, x, y, loss_fn = CASES[0].make("sum", torch.float64)
    with PerExampleGradients(model, "sum") as pe:
        model(torch.randn_like(x))  # discarded
        loss_fn(model(x), y).backward()
    assert [r.num_calls for r in pe.layers.values()] == [2, 2, 2]
    assert all(r.grad_outputs[0] is None for r in pe.layers.values())
    for name, expected in reference(model, x, y, loss_fn).items():
        torch.testing.assert_close(pe.grads[name], expected, **F64, msg=name)


def test_a_partial_backward_leaves_the_layers_it_stops_short_of_at_zero():
    """autograd.grad(loss, [last weight]) never reaches the first layers: as documented."""
    model, x, y, loss_fn = CASES[0].make("sum", torch.float64)
    with PerExampleGradients(model, "sum") as pe:
        torch.autograd.grad(loss_fn(model(x), y), [model[4].weight])
    want = reference(model, x, y, loss_fn)
    torch.testing.assert_close(pe.grads["4.weight"], want["4.weight"], **F64)
    assert not pe.grads["0.weight"].any() and want["0.weight"].any()


def test_model_called_twice_for_one_loss():
    """A siamese loss L_i = ||f(x_i) - f(x'_i)||²: both calls belong to example i."""
    torch.manual_seed(0)
    model = sequential_mlp().double()
    x, x2 = torch.randn(4, 4).double(), torch.randn(4, 4).double()
    with PerExampleGradients(model, "sum") as pe:
        (model(x) - model(x2)).square().sum().backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(p, a, b):
        return functional_call(model, p, (a[None],)) - functional_call(model, p, (b[None],))

    def squared(p, a, b):
        return loss_of_one(p, a, b).square().sum()

    want = vmap(grad(squared), in_dims=(None, 0, 0))(params, x, x2)
    for name in params:
        torch.testing.assert_close(pe.grads[name], want[name], **F64, msg=name)


def test_torch_func_inside_the_context_is_not_recorded():
    model, x, y, loss_fn = CASES[3].make("mean", torch.float64)
    with PerExampleGradients(model, "mean") as pe:
        loss_fn(model(x), y).backward()
        want = reference(model, x, y, loss_fn)  # runs the model under vmap(grad(...))
        assert pe.layers["block.shared"].num_calls == 2
        for name, expected in want.items():
            torch.testing.assert_close(pe.grads[name], expected, **F64, msg=name)


class Checkpointed(nn.Module):
    """Two Linear layers, the first inside activation checkpointing."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        def block(t):
            return torch.tanh(self.first(t))

        hidden = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.second(hidden)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_is_refused(use_reentrant):
    # The checkpointed Linear runs again inside the backward; that must neither start a new
    # batch (dropping what 'second' recorded: silently zero gradients) nor count as a call.
    model = Checkpointed(use_reentrant).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=use_reentrant)
    y = torch.randn(5, 2, dtype=torch.float64)
    with PerExampleGradients(model) as pe:
        with pytest.raises(ValueError, match="'first' ran during the backward.*checkpoint"):
            nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        assert pe.layers["second"].num_calls == 1  # the batch was not replaced


def test_attach_twice():
    pe = PerExampleGradients(sequential_mlp()).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        pe.attach()
    pe.detach()


def test_input_without_batch_dimension():
    model = nn.Linear(3, 2)
    with PerExampleGradients(model), pytest.raises(ValueError, match="the model itself.*no batch"):
        model(torch.randn(3))


def test_layers_that_see_different_batch_sizes():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):  # x: (n, T, 3); the second layer sees (T, n, 3)
            return self.b(self.a(x).transpose(0, 1))

    model = SequenceFirst()
    with PerExampleGradients(model), pytest.raises(
        ValueError, match="'b' got 4 examples.*model's input has 2.*keep the batch"
    ):
        model(torch.randn(2, 4, 3))


def test_bad_out():
    model, x, y, loss_fn = CASES[0].make("sum", torch.float64)
    pe = record(model, x, y, loss_fn, "sum")
    good = {k: torch.empty_like(v) for k, v in pe.grads.items()}
    with pytest.raises(TypeError, match="dict from parameter name"):
        pe.compute_grads(out=list(good.values()))
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        pe.compute_grads(out={k: v for k, v in good.items() if k != "4.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        pe.compute_grads(out={**good, "extra": torch.empty(1)})
    with pytest.raises(TypeError, match=r"out\['0.bias'\] must be a torch.Tensor"):
        pe.compute_grads(out={**good, "0.bias": 1.0})
    with pytest.raises(ValueError, match=r"out\['0.bias'\] must be a torch.float64 tensor of sh"):
        pe.compute_grads(out={**good, "0.bias": torch.empty(5, 6, dtype=torch.float32)})
    with pytest.raises(ValueError, match=r"out\['0.bias'\] must be a torch.float64 tensor of sh"):
        pe.compute_grads(out={**good, "0.bias": torch.empty(4, 6, dtype=torch.float64)})
    transposed = torch.empty(5, 4, 6, dtype=torch.float64).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        pe.compute_grads(out={**good, "0.weight": transposed})
