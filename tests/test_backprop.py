"""Goodfellow's trick against the naive loop, torch.func and autograd's batch gradient.

Settings are a list of cases (model, input, loss, reduction, seed) in the BackPACK style; every
test runs the same case through the routes it compares.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import goodfellow
from goodfellow import (
    MLP,
    goodfellow_backprop,
    naive_per_example_grads,
    per_example_grads,
    per_example_norms,
    torch_func_per_example_grads,
)
from goodfellow.layers import linear as linear_rule
from goodfellow.layers import routes
from tests.conftest import TOLERANCES

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
WIDTHS_BY_DEPTH = {1: [], 2: [7], 3: [1, 32], 4: [16, 5, 9]}


@dataclass(frozen=True)
class Case:
    """One setting: an MLP, a batch, a loss and its reduction."""

    depth: int
    activation: str
    batch: int
    loss: str
    reduction: str
    input_size: int = 6
    seed: int = 0

    @property
    def output_size(self) -> int:
        # cross-entropy needs at least two classes; MSE is tested with 1 and with several outputs
        return 4 if self.loss == "cross_entropy" else 1 + (self.depth % 2) * 2

    @property
    def id(self) -> str:
        return (
            f"depth{self.depth}-{self.activation}-n{self.batch}-{self.loss}-{self.reduction}"
            f"-out{self.output_size}"
        )

    def make(self, dtype: torch.dtype = torch.float64):
        """Build the model, the batch and the loss function of this case."""
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        model = MLP(
            self.input_size,
            WIDTHS_BY_DEPTH[self.depth],
            self.output_size,
            activation=ACTIVATIONS[self.activation],
        ).to(dtype)
        x = torch.randn(self.batch, self.input_size, generator=generator, dtype=dtype)
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.output_size, (self.batch,), generator=generator)
            loss_fn = nn.CrossEntropyLoss(reduction=self.reduction)
        else:
            y = torch.randn(self.batch, self.output_size, generator=generator, dtype=dtype)
            loss_fn = nn.MSELoss(reduction=self.reduction)
        return model, x, y, loss_fn


CASES = [
    Case(depth, activation, batch, loss, reduction)
    for depth, activation, batch, loss, reduction in itertools.product(
        [1, 2, 3, 4], ["relu", "tanh", "sigmoid"], [1, 2, 64], ["mse", "cross_entropy"],
        ["sum", "mean"],
    )
]


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


def goodfellow_route(model, x, y, loss_fn, create_graph=False):
    prediction, activations, linear_combs = model(x)
    loss = loss_fn(prediction, y)
    # keep the graph: some tests differentiate the same loss w.r.t. the parameters afterwards
    linear_grads = torch.autograd.grad(
        loss, linear_combs, retain_graph=True, create_graph=create_graph
    )
    return activations, linear_grads, loss


def assert_lists_close(actual, expected, dtype=torch.float64):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_goodfellow_matches_naive_loop_and_torch_func(case):
    model, x, y, loss_fn = case.make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, case.reduction)
    # L_i is the same loss on example i alone, whatever the batch reduction
    naive = naive_per_example_grads(model, loss_fn, x, y)
    functional = torch_func_per_example_grads(model, loss_fn, x, y)
    assert_lists_close(grads, naive)
    assert_lists_close(functional, naive)


def test_layout_is_pytorch_out_in(case):
    model, x, y, loss_fn = case.make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, case.reduction)
    for g, p in zip(grads, model.parameters()):
        assert g.shape == (case.batch, *p.shape)


def test_per_example_grads_reduce_to_the_batch_gradient(case):
    model, x, y, loss_fn = case.make()
    activations, linear_grads, loss = goodfellow_route(model, x, y, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, case.reduction)
    batch_grads = torch.autograd.grad(loss, list(model.parameters()))
    reduce = torch.mean if case.reduction == "mean" else torch.sum
    assert_lists_close([reduce(g, dim=0) for g in grads], list(batch_grads))


def test_norms_match_materialized_gradients(case):
    model, x, y, loss_fn = case.make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, case.reduction)
    flat = torch.cat([g.reshape(case.batch, -1) for g in grads], dim=1)  # (n, P)
    norms = per_example_norms(activations, linear_grads, case.reduction)
    assert norms.shape == (case.batch,)
    torch.testing.assert_close(norms, flat.norm(dim=1), **TOLERANCES[torch.float64])


FLOAT32_CASES = [c for c in CASES if c.batch == 64 and c.activation == "tanh"]


@pytest.mark.parametrize("case32", FLOAT32_CASES, ids=[c.id for c in FLOAT32_CASES])
def test_float32_agrees_with_float64_reference(case32):
    """float32 results stay within the stated tolerance of the float64 naive loop."""
    model64, x64, y64, loss_fn = case32.make(torch.float64)
    model32 = MLP(
        case32.input_size, WIDTHS_BY_DEPTH[case32.depth], case32.output_size, torch.tanh
    )
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    y32 = y64 if case32.loss == "cross_entropy" else y64.float()
    activations, linear_grads, _ = goodfellow_route(model32, x64.float(), y32, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, case32.reduction)
    naive = naive_per_example_grads(model64, loss_fn, x64, y64)
    assert_lists_close([g.double() for g in grads], naive, dtype=torch.float32)


def test_convenience_route_reads_the_reduction_of_the_loss(case):
    model, x, y, loss_fn = case.make()
    assert_lists_close(
        per_example_grads(model, loss_fn, x, y), naive_per_example_grads(model, loss_fn, x, y)
    )


def test_out_buffers_are_filled_and_reused():
    model, x, y, loss_fn = Case(3, "tanh", 64, "cross_entropy", "mean").make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    expected = goodfellow_backprop(activations, linear_grads, "mean")
    buffers = [torch.full_like(g, float("nan")) for g in expected]
    result = goodfellow_backprop(activations, linear_grads, "mean", out=buffers)
    assert all(r.data_ptr() == b.data_ptr() for r, b in zip(result, buffers))
    assert_lists_close(result, expected)


def test_results_can_be_clipped_in_place_without_touching_the_inputs():
    """A loss that sums the outputs gets an expanded (stride 0) gradient from autograd."""
    model = MLP(3, [4], 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    prediction, activations, linear_combs = model(x)
    linear_grads = torch.autograd.grad(prediction.sum(), linear_combs)
    assert linear_grads[-1].stride() == (0, 0)
    kept = [g.clone() for g in linear_grads]
    grads = goodfellow_backprop(activations, linear_grads)
    naive = naive_per_example_grads(model, lambda p, t: p.sum(), x, x)
    for g in grads:
        g.mul_(0.5)  # e.g. scaling each example's gradient to a clipping norm
    assert_lists_close(grads, [0.5 * g for g in naive])
    assert all(torch.equal(g, k) for g, k in zip(linear_grads, kept))


def test_second_order_gradient_of_mean_squared_norm_matches_torch_func():
    """d/dθ mean_i ||g_i||², through goodfellow_backprop, equals torch.func's."""
    torch.manual_seed(3)
    model = MLP(5, [6, 4], 3, activation=torch.tanh).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss(reduction="mean")

    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn, create_graph=True)
    grads = goodfellow_backprop(activations, linear_grads, "mean")
    objective = sum(g.reshape(9, -1).square().sum(1) for g in grads).mean()
    ours = torch.autograd.grad(objective, list(model.parameters()), retain_graph=True)
    # the same objective through per_example_norms, which never materializes g_i
    norms = per_example_norms(activations, linear_grads, "mean")
    ours_from_norms = torch.autograd.grad(norms.square().mean(), list(model.parameters()))

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],))[0], yi[None])

    def mean_squared_norm(p):
        per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(p, x, y)
        return sum(g.reshape(9, -1).square().sum(1) for g in per_example.values()).mean()

    reference = grad(mean_squared_norm)(params)
    expected = [reference[name] for name, _ in model.named_parameters()]
    assert_lists_close(list(ours), expected)
    assert_lists_close(list(ours_from_norms), expected)


# --- hypothesis: random shapes -----------------------------------------------------------------


@given(
    input_size=st.integers(1, 12),
    hidden=st.lists(st.integers(1, 12), min_size=0, max_size=3),
    output_size=st.integers(1, 5),
    batch=st.integers(1, 16),
    reduction=st.sampled_from(["sum", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_mlps_agree_with_torch_func(
    input_size, hidden, output_size, batch, reduction, seed
):
    torch.manual_seed(seed)
    model = MLP(input_size, hidden, output_size, activation=torch.tanh).double()
    x = torch.randn(batch, input_size, dtype=torch.float64)
    y = torch.randn(batch, output_size, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    activations, linear_grads, loss = goodfellow_route(model, x, y, loss_fn)
    grads = goodfellow_backprop(activations, linear_grads, reduction)
    assert_lists_close(grads, torch_func_per_example_grads(model, loss_fn, x, y))
    flat = torch.cat([g.reshape(batch, -1) for g in grads], dim=1)
    torch.testing.assert_close(
        per_example_norms(activations, linear_grads, reduction), flat.norm(dim=1),
        **TOLERANCES[torch.float64],
    )


@given(
    batch=st.integers(1, 8),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    positions=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_property_batched_outer_is_the_sum_of_outer_products(batch, d_in, d_out, positions, seed):
    generator = torch.Generator().manual_seed(seed)
    grad_outputs = torch.randn(batch, *positions, d_out, generator=generator, dtype=torch.float64)
    inputs = torch.randn(batch, *positions, d_in, generator=generator, dtype=torch.float64)
    result = goodfellow.batched_outer(grad_outputs, inputs)
    g = grad_outputs.reshape(batch, -1, d_out)
    a = inputs.reshape(batch, -1, d_in)
    for i in range(batch):
        expected = sum(torch.outer(g[i, t], a[i, t]) for t in range(g.shape[1]))
        torch.testing.assert_close(result[i], expected, **TOLERANCES[torch.float64])


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def small_chain():
    model, x, y, loss_fn = Case(3, "relu", 5, "mse", "sum").make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    return list(activations), list(linear_grads)


def test_refuses_lists_of_different_lengths(small_chain):
    activations, linear_grads = small_chain
    with pytest.raises(ValueError, match="one entry per linear layer"):
        goodfellow_backprop(activations[:-1], linear_grads)


def test_refuses_empty_lists():
    with pytest.raises(ValueError, match="empty"):
        goodfellow_backprop([], [])


def test_refuses_batch_sizes_that_differ(small_chain):
    activations, linear_grads = small_chain
    linear_grads[1] = linear_grads[1][:-1]
    with pytest.raises(ValueError, match="batch sizes differ"):
        goodfellow_backprop(activations, linear_grads)


@pytest.mark.parametrize("bad_shape", [(5,), (5, 3, 2)])
def test_refuses_tensors_of_the_wrong_rank(small_chain, bad_shape):
    activations, linear_grads = small_chain
    activations[0] = torch.randn(*bad_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(n, features\)"):
        goodfellow_backprop(activations, linear_grads)


def test_refuses_layers_that_do_not_chain(small_chain):
    activations, linear_grads = small_chain
    activations[1] = torch.randn(5, activations[1].shape[1] + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not describe one chain"):
        goodfellow_backprop(activations, linear_grads)


def test_refuses_swapped_lists(small_chain):
    activations, linear_grads = small_chain
    with pytest.raises(ValueError, match="do not describe one chain"):
        goodfellow_backprop(linear_grads, activations)


def test_refuses_unknown_reduction(small_chain):
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        goodfellow_backprop(*small_chain, loss_reduction="average")
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        per_example_norms(*small_chain, loss_reduction="none")


def test_refuses_non_tensors(small_chain):
    activations, linear_grads = small_chain
    activations[0] = activations[0].tolist()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        goodfellow_backprop(activations, linear_grads)
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        goodfellow_backprop(torch.randn(3, 2), linear_grads)


def test_refuses_empty_batch():
    model = MLP(3, [4], 2).double()
    x = torch.randn(0, 3, dtype=torch.float64)
    _, activations, linear_combs = model(x)
    linear_grads = [torch.zeros_like(z) for z in linear_combs]
    with pytest.raises(ValueError, match="batch is empty"):
        goodfellow_backprop(activations, linear_grads)
    with pytest.raises(ValueError, match="batch is empty"):
        naive_per_example_grads(model, nn.MSELoss(), x, torch.zeros(0, 2, dtype=torch.float64))


def test_refuses_mixed_dtypes(small_chain):
    activations, linear_grads = small_chain
    linear_grads[0] = linear_grads[0].float()
    with pytest.raises(ValueError, match="one dtype on one device"):
        goodfellow_backprop(activations, linear_grads)


def test_refuses_out_buffers_that_do_not_fit(small_chain):
    expected = goodfellow_backprop(*small_chain)
    buffers = [torch.empty_like(g) for g in expected]
    buffers[0] = torch.empty(1, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"out\[0\] must be"):
        goodfellow_backprop(*small_chain, out=buffers)
    with pytest.raises(ValueError, match="2 tensors per layer"):
        goodfellow_backprop(*small_chain, out=buffers[:2])


def test_refuses_out_buffers_when_differentiating():
    model, x, y, loss_fn = Case(2, "tanh", 4, "mse", "sum").make()
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn, create_graph=True)
    buffers = [torch.empty_like(g) for g in goodfellow_backprop(activations, linear_grads)]
    with pytest.raises(ValueError, match="not differentiable"):
        goodfellow_backprop(activations, linear_grads, out=buffers)


def test_references_refuse_mismatched_batches():
    model = MLP(3, [4], 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="different numbers of examples"):
        naive_per_example_grads(model, nn.MSELoss(), x, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        torch_func_per_example_grads(lambda t: t, nn.MSELoss(), x, x)


@pytest.mark.parametrize("reference", [naive_per_example_grads, torch_func_per_example_grads])
def test_references_refuse_models_without_trainable_parameters(reference):
    model = nn.Linear(3, 2).double().requires_grad_(False)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        reference(model, nn.MSELoss(), x, y)


def test_convenience_route_refuses_models_without_intermediates():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="PerExampleGradients"):
        per_example_grads(model, nn.MSELoss(), x, torch.zeros(4, 2, dtype=torch.float64))


def test_convenience_route_needs_the_reduction_of_a_plain_function():
    model, x, y, _ = Case(2, "tanh", 5, "mse", "sum").make()

    def summed_squares(prediction, target):
        return (prediction - target).square().sum()

    with pytest.raises(TypeError, match="pass loss_reduction"):
        per_example_grads(model, summed_squares, x, y)
    assert_lists_close(
        per_example_grads(model, summed_squares, x, y, loss_reduction="sum"),
        naive_per_example_grads(model, summed_squares, x, y),
    )


def test_norms_have_a_finite_derivative_at_an_example_with_zero_gradient():
    torch.manual_seed(5)
    model = MLP(3, [4], 2, activation=torch.tanh).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = model(x)[0].detach().clone()
    y[1:] += torch.randn(3, 2, dtype=torch.float64)  # example 0 is fit exactly: g_0 = 0
    loss_fn = nn.MSELoss(reduction="sum")
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn, create_graph=True)
    norms = per_example_norms(activations, linear_grads)
    assert norms[0] == 0
    ours = torch.autograd.grad(norms.sum(), list(model.parameters()), retain_graph=True)
    # the reference: vector_norm of the materialized gradients, whose subgradient at 0 is 0
    grads = goodfellow_backprop(activations, linear_grads)
    flat = torch.cat([g.reshape(4, -1) for g in grads], dim=1)  # (n, P)
    reference = torch.autograd.grad(
        torch.linalg.vector_norm(flat, dim=1).sum(), list(model.parameters())
    )
    assert all(torch.isfinite(g).all() for g in ours)
    assert_lists_close(list(ours), list(reference))


@given(
    batch=st.integers(1, 8),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_outer_sq_norms_equal_norms_of_the_outer_products(batch, d_in, d_out, seed):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, d_out, generator=generator, dtype=torch.float64)
    a = torch.randn(batch, d_in, generator=generator, dtype=torch.float64)
    expected = goodfellow.batched_outer(g, a).square().sum(dim=(1, 2))
    result = goodfellow.outer_sq_norms(g, a)
    torch.testing.assert_close(result, expected, **TOLERANCES[torch.float64])
    # with the bias, whose per-example gradient is G_i itself
    with_bias = goodfellow.outer_sq_norms(g, a, bias=True)
    expected_with_bias = expected + g.square().sum(dim=1)
    torch.testing.assert_close(with_bias, expected_with_bias, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_norm_from_squares_is_the_square_root_and_reads_round_off_negatives_as_zero(
    requires_grad,
):
    squares = torch.tensor([4.0, 0.0, -1e-18, 2.25], dtype=torch.float64)
    squares.requires_grad_(requires_grad)
    roots = goodfellow.norm_from_squares(squares)
    expected_roots = torch.tensor([2.0, 0.0, 0.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(roots.detach(), expected_roots)
    if requires_grad:
        (derivative,) = torch.autograd.grad(roots.sum(), squares)
        # d sqrt(s)/ds = 1 / (2 sqrt(s)) where s > 0, the subgradient 0 elsewhere
        expected = torch.tensor([0.25, 0.0, 0.0, 1 / 3], dtype=torch.float64)
        torch.testing.assert_close(derivative, expected, **TOLERANCES[torch.float64])


# --- batched_outer: layouts it accepts, shapes it refuses ---------------------------------------


def outer_reference(grad_outputs, inputs):
    """Σ_t G_t A_tᵀ example by example, one torch.outer at a time."""
    n, d_out, d_in = grad_outputs.shape[0], grad_outputs.shape[-1], inputs.shape[-1]
    g, a = grad_outputs.reshape(n, -1, d_out), inputs.reshape(n, -1, d_in)
    return torch.stack([
        sum(torch.outer(g[i, t], a[i, t]) for t in range(g.shape[1])) for i in range(n)
    ])


@pytest.mark.parametrize("positions", [(), (5,)], ids=["2d", "3d"])
def test_batched_outer_reads_any_strides_and_writes_into_a_strided_out(positions):
    generator = torch.Generator().manual_seed(1)
    g = torch.randn(4, 3, *positions, generator=generator, dtype=torch.float64)
    g = g.movedim(1, -1)  # (n, ..., 3), not contiguous
    a = torch.randn(1, *positions, 2, generator=generator, dtype=torch.float64)
    a = a.expand(4, *positions, 2)  # stride 0 over the batch
    expected = outer_reference(g, a)
    out = torch.full((4, 2, 3), float("nan"), dtype=torch.float64).transpose(1, 2)
    result = goodfellow.batched_outer(g, a, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])
    fresh = goodfellow.batched_outer(g, a)
    torch.testing.assert_close(fresh, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kernel", ["broadcast product", "bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_both_outer_product_kernels_write_exactly_the_products(kernel, dtype, monkeypatch):
    # every size is timed here (the threshold is lowered); each kernel forms one product per
    # entry, so the two agree bit for bit, also into a strided out
    monkeypatch.setattr(linear_rule, "_TIMED_OUTER_BYTES", 0)
    monkeypatch.setattr(routes, "_CHOSEN", {})
    generator = torch.Generator().manual_seed(2)
    g = torch.randn(3, 6, generator=generator, dtype=dtype).T  # (6, 3), not contiguous
    a = torch.randn(6, 4, generator=generator, dtype=dtype)
    expected = g[:, :, None] * a[:, None, :]  # (6, 3, 4)
    with routes.forced(kernel):
        fresh = goodfellow.batched_outer(g, a)
        out = torch.full((6, 4, 3), float("nan"), dtype=dtype).transpose(1, 2)
        written = goodfellow.batched_outer(g, a, out=out)
    assert torch.equal(fresh, expected)
    assert written.data_ptr() == out.data_ptr() and torch.equal(out, expected)
    assert routes.chosen() == {}  # forced: nothing timed
    timed = goodfellow.batched_outer(g, a)
    assert torch.equal(timed, expected)
    assert [key[0] for key in routes.chosen()] == ["outer product"]


@pytest.mark.parametrize(
    ("g_shape", "a_shape"),
    [
        ((1, 3), (4, 2)),  # would broadcast one example's gradient over the batch
        ((4, 3), (1, 2)),
        ((2, 3, 3), (3, 2, 2)),  # would reshape 3 examples into 2
        ((4, 2, 3, 3), (4, 3, 2, 2)),  # six positions, but not the same ones
        ((4, 3), (4, 5, 2)),
        ((4, 5, 3), (4, 2)),
        ((3,), (3,)),
    ],
    ids=["g-batch-1", "a-batch-1", "reshapeable", "middle", "2d-3d", "3d-2d", "1d"],
)
def test_batched_outer_refuses_shapes_that_do_not_fit(g_shape, a_shape):
    g, a = torch.randn(g_shape), torch.randn(a_shape)
    with pytest.raises(ValueError, match="do not fit"):
        goodfellow.batched_outer(g, a)


def test_batched_outer_refuses_mixed_dtypes_non_tensors_and_bad_out():
    g, a = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="one dtype on one device"):
        goodfellow.batched_outer(g, a.float())
    with pytest.raises(ValueError, match="one dtype on one device"):
        goodfellow.batched_outer(g[:, None].expand(4, 5, 3), a[:, None].expand(4, 5, 2).float())
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        goodfellow.batched_outer(g, a.tolist())
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        goodfellow.batched_outer(g, a, out=[])
    for bad in (torch.empty(4, 3, 3, dtype=torch.float64), torch.empty(4, 3, 2)):
        with pytest.raises(ValueError, match=r"out must be a torch.float64 tensor of shape"):
            goodfellow.batched_outer(g, a, out=bad)


def test_batched_outer_refuses_an_out_that_holds_its_inputs():
    buffer = torch.randn(4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shares memory"):
        goodfellow.batched_outer(buffer[:, :, 0], buffer[:, 0, :], out=buffer)


# --- goodfellow_backprop: out= that aliases ----------------------------------------------------


@pytest.fixture
def equal_width_chain():
    """Two hidden layers of one width: bias buffers (n, 4) of layers 1 and 2 are swappable."""
    model = MLP(3, [4, 4], 2).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn)
    return list(activations), list(linear_grads), naive_per_example_grads(model, loss_fn, x, y)


def test_out_buffers_may_be_views_of_one_flat_buffer(equal_width_chain):
    activations, linear_grads, naive = equal_width_chain
    flat = torch.full((sum(g.numel() for g in naive),), float("nan"), dtype=torch.float64)
    chunks = flat.split([g.numel() for g in naive])
    buffers = [chunk.view(g.shape) for chunk, g in zip(chunks, naive)]
    assert_lists_close(goodfellow_backprop(activations, linear_grads, out=buffers), naive)


def test_refuses_out_buffers_that_share_memory(equal_width_chain):
    activations, linear_grads, naive = equal_width_chain
    buffers = [torch.empty_like(g) for g in naive]
    buffers[3] = buffers[1]  # layer 2's bias would overwrite layer 1's
    with pytest.raises(ValueError, match=r"out\[(1|3)\] shares memory"):
        goodfellow_backprop(activations, linear_grads, out=buffers)
    buffers = [torch.empty_like(g) for g in naive]
    buffers[1] = linear_grads[1]  # layer 1's bias would overwrite the input of layer 2
    with pytest.raises(ValueError, match=r"out\[1\] shares memory"):
        goodfellow_backprop(activations, linear_grads, out=buffers)


# --- per_example_grads: losses and states it refuses --------------------------------------------


def test_convenience_route_refuses_a_forward_without_gradients():
    model, x, y, loss_fn = Case(2, "tanh", 5, "mse", "sum").make()
    for context in (torch.no_grad, torch.inference_mode):
        with context(), pytest.raises(ValueError, match="does not require grad.*no_grad"):
            per_example_grads(model, loss_fn, x, y)
    model.layers[0].requires_grad_(False)
    with pytest.raises(ValueError, match="linear layer 1 does not require grad"):
        per_example_grads(model, loss_fn, x, y)


def test_convenience_route_refuses_a_reduction_that_contradicts_the_loss():
    model, x, y, _ = Case(2, "tanh", 5, "mse", "sum").make()
    with pytest.raises(ValueError, match="contradicts loss_fn.reduction='sum'"):
        per_example_grads(model, nn.MSELoss(reduction="sum"), x, y, loss_reduction="mean")
    assert_lists_close(  # agreeing is fine
        per_example_grads(model, nn.MSELoss(), x, y, loss_reduction="mean"),
        naive_per_example_grads(model, nn.MSELoss(), x, y),
    )


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 5.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHTS), "class weights"),
        (nn.CrossEntropyLoss(ignore_index=2), "ignore_index=2"),
        (nn.NLLLoss(weight=CLASS_WEIGHTS), "class weights"),
    ],
    ids=["weighted-ce", "ignored-ce", "weighted-nll"],
)
def test_convenience_route_refuses_means_that_do_not_divide_by_n(loss_fn, message):
    """Their mean is Σ w_i L_i / Σ w_i (or over the kept targets), not (1/n) Σ L_i."""
    model, x, _, _ = Case(2, "tanh", 6, "cross_entropy", "mean").make()
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    with pytest.raises(ValueError, match=f"{message}.*reduction='sum'"):
        per_example_grads(model, loss_fn, x, y)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=CLASS_WEIGHTS, reduction="sum"),
        nn.CrossEntropyLoss(ignore_index=2, reduction="sum"),
        nn.CrossEntropyLoss(ignore_index=3),  # a mean whose targets hit no ignore_index
        nn.CrossEntropyLoss(weight=CLASS_WEIGHTS, label_smoothing=0.1, reduction="sum"),
    ],
    ids=["weighted-sum", "ignored-sum", "ignore-unused-mean", "smoothed-weighted-sum"],
)
def test_weighted_and_ignoring_losses_are_exact_when_summed(loss_fn):
    model, x, _, _ = Case(2, "tanh", 6, "cross_entropy", "sum").make()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    assert_lists_close(
        per_example_grads(model, loss_fn, x, y), naive_per_example_grads(model, loss_fn, x, y)
    )


def test_weighted_mean_over_class_probabilities_divides_by_n():
    model, x, _, _ = Case(2, "tanh", 6, "cross_entropy", "mean").make()
    y = torch.softmax(torch.randn(6, 4, dtype=torch.float64), dim=1)
    loss_fn = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
    assert_lists_close(
        per_example_grads(model, loss_fn, x, y), naive_per_example_grads(model, loss_fn, x, y)
    )


# --- KLDivLoss(reduction="batchmean") is the package's "mean" ----------------------------------


class LogSoftmaxKL(nn.KLDivLoss):
    """KL divergence of class probabilities from the model's logits (carries ``.reduction``)."""

    def forward(self, logits, target):
        return super().forward(torch.log_softmax(logits, dim=-1), target)


def _kl_setting(depth, seed=0):
    torch.manual_seed(seed)
    model = MLP(5, WIDTHS_BY_DEPTH[depth], 3, activation=torch.tanh).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    target = torch.softmax(torch.randn(7, 3, generator=generator, dtype=torch.float64), dim=-1)
    return model, x, target


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("given", [None, "mean", "batchmean"])
def test_kl_divergence_batchmean_matches_the_naive_loop(depth, given):
    # batchmean divides the summed loss by n: (1/n) sum_i L_i with L_i the loss of example i
    # alone, which is what the naive loop differentiates
    model, x, target = _kl_setting(depth)
    loss_fn = LogSoftmaxKL(reduction="batchmean")
    got = per_example_grads(model, loss_fn, x, target, loss_reduction=given)
    assert_lists_close(got, naive_per_example_grads(model, loss_fn, x, target))
    # and they average to autograd's gradient of the batch loss
    batch = torch.autograd.grad(loss_fn(model(x)[0], target), list(model.parameters()))
    assert_lists_close([g.mean(0) for g in got], list(batch))


def test_kl_divergence_batchmean_contradicts_sum():
    model, x, target = _kl_setting(2)
    with pytest.raises(ValueError, match="contradicts loss_fn.reduction='batchmean'"):
        per_example_grads(model, LogSoftmaxKL(reduction="batchmean"), x, target,
                          loss_reduction="sum")  # fmt: skip


# --- outputs passed where their gradients belong -----------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("function", ["goodfellow_backprop", "per_example_norms", "mlp_factors"])
def test_layer_outputs_passed_as_their_gradients_are_refused(depth, function):
    model = MLP(4, WIDTHS_BY_DEPTH[depth], 3).double()
    # an input that requires grad lets even a one-layer model be told apart; deeper ones always
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=depth == 1)
    _, activations, linear_combs = model(x)
    call = getattr(goodfellow, function)
    with pytest.raises(ValueError, match=r"linear_grads\[\d\] \(layer \d\) is not a gradient"):
        call(activations, linear_combs)


def test_a_differentiable_gradient_is_not_mistaken_for_a_layer_output():
    # with create_graph=True the gradients carry a graph as the outputs do; they are still
    # accepted, and the result is still the naive loop's
    for depth, activation in itertools.product([1, 2, 4], ["relu", "tanh", "sigmoid"]):
        model, x, y, loss_fn = Case(depth, activation, 6, "mse", "sum").make()
        x.requires_grad_(True)
        activations, linear_grads, _ = goodfellow_route(model, x, y, loss_fn, create_graph=True)
        assert all(g.requires_grad for g in linear_grads)
        got = goodfellow_backprop(activations, linear_grads)
        x.requires_grad_(False)
        assert_lists_close([g.detach() for g in got], naive_per_example_grads(model, loss_fn, x, y))
