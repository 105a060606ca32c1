"""Transformed per-example gradients, their statistics, and CABS, against independent references.

References: the naive loop (one backward per example), torch.func (vmap of grad, and grad of
that for differentiated transformations), per-row loops applying a transformation to one
example at a time, torch.var / torch.cov, and closed forms for hand-made gradients. The
factored route (LinearFactors) is compared with the materialized one on every statistic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import goodfellow
from goodfellow import (
    CABS,
    MLP,
    AdaptiveBatchSampler,
    LinearFactors,
    adaptive_batches,
    assign_grads,
    clip_to_norm,
    clipped_mean,
    expected_transform,
    gradient_mean,
    gradient_noise_scale,
    gradient_norms,
    gradient_second_moment,
    gradient_variance,
    gradient_variance_trace,
    linear_factors,
    mlp_factors,
    naive_per_example_grads,
    noise_scale_parts,
    per_example_grads,
    per_example_norms,
    recorded_factors,
    torch_func_per_example_grads,
)
from tests.conftest import TOLERANCES


def assert_close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def assert_all_close(actual, expected, dtype=torch.float64):
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        actual, expected = list(actual.values()), list(expected.values())
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype)


# --------------------------------------------------------------------------------------------
# Cases: an MLP, a batch, a loss (BackPACK style: a list of settings turned into tests)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    hidden: tuple[int, ...]
    batch: int
    loss: str
    reduction: str
    dtype: torch.dtype = torch.float64
    seed: int = 0

    @property
    def id(self) -> str:
        dtype = "f64" if self.dtype == torch.float64 else "f32"
        return f"h{list(self.hidden)}-n{self.batch}-{self.loss}-{self.reduction}-{dtype}"


CASES = [
    Case((), 5, "mse", "sum"),
    Case((6,), 7, "mse", "mean"),
    Case((6, 4), 9, "cross_entropy", "sum"),
    Case((3,), 2, "cross_entropy", "mean", seed=1),
    Case((8, 5), 12, "mse", "mean", seed=2),
    Case((6, 4), 9, "cross_entropy", "mean", dtype=torch.float32),
    Case((8,), 11, "mse", "sum", dtype=torch.float32, seed=3),
]
F64_CASES = [case for case in CASES if case.dtype == torch.float64]


@dataclass
class Setting:
    model: MLP
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.Module
    dtype: torch.dtype

    def reference(self) -> list[torch.Tensor]:
        """Per-example gradients by the naive loop, one backward per example."""
        return naive_per_example_grads(self.model, self.loss_fn, self.x, self.y)

    def factors(self, create_graph: bool = False) -> list[LinearFactors]:
        y_hat, activations, linear_combs = self.model(self.x)
        loss = self.loss_fn(y_hat, self.y)
        linear_grads = torch.autograd.grad(loss, linear_combs, create_graph=create_graph)
        if not create_graph:
            activations = [a.detach() for a in activations]
        return mlp_factors(activations, linear_grads, self.loss_fn.reduction)


def make_setting(case: Case) -> Setting:
    generator = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    outputs = 4 if case.loss == "cross_entropy" else 3
    model = MLP(5, list(case.hidden), outputs, activation=torch.tanh).to(case.dtype)
    x = torch.randn(case.batch, 5, generator=generator, dtype=case.dtype)
    if case.loss == "cross_entropy":
        y = torch.randint(0, outputs, (case.batch,), generator=generator)
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=case.reduction)
    else:
        y = torch.randn(case.batch, outputs, generator=generator, dtype=case.dtype)
        loss_fn = nn.MSELoss(reduction=case.reduction)
    return Setting(model, x, y, loss_fn, case.dtype)


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def setting(request) -> Setting:
    return make_setting(request.param)


@pytest.fixture(params=F64_CASES, ids=[case.id for case in F64_CASES])
def setting64(request) -> Setting:
    return make_setting(request.param)


def flat_rows(grads: list[torch.Tensor]) -> torch.Tensor:
    n = grads[0].shape[0]
    return torch.cat([g.reshape(n, -1) for g in grads], dim=1)


def unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for g in like:
        size = math.prod(g.shape[1:])
        out.append(vector[start : start + size].reshape(g.shape[1:]))
        start += size
    return out


def loop_mean_of_transform(grads: list[torch.Tensor], T) -> list[torch.Tensor]:
    """The reference for E[T(g)]: T applied to one example at a time, then averaged."""
    rows = flat_rows(grads)
    transformed = torch.stack([T(rows[i : i + 1])[0] for i in range(rows.shape[0])])
    return unflat(transformed.sum(0) / rows.shape[0], grads)


# --------------------------------------------------------------------------------------------
# expected_transform
# --------------------------------------------------------------------------------------------

TRANSFORMS = {
    "identity": lambda g: g,
    "sign": torch.sign,
    "square": torch.square,
    "normalize": lambda g: g / torch.linalg.vector_norm(g, dim=1, keepdim=True),
    "scale_by_norm": lambda g: g * torch.linalg.vector_norm(g, dim=1, keepdim=True),
    "clip_0.3": clip_to_norm(0.3),
    "cubic": lambda g: g**3 - 0.5 * g,
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_expected_transform_matches_per_example_loop(setting, name):
    T = TRANSFORMS[name]
    reference = setting.reference()
    grads = per_example_grads(setting.model, setting.loss_fn, setting.x, setting.y)
    actual = expected_transform(grads, T)
    assert isinstance(actual, list)
    assert_all_close(actual, loop_mean_of_transform(reference, T), setting.dtype)


def test_identity_transform_is_the_batch_gradient(setting):
    """E[g_i] is autograd's gradient of the mean of the per-example losses."""
    grads = per_example_grads(setting.model, setting.loss_fn, setting.x, setting.y)
    loss = setting.loss_fn(setting.model(setting.x)[0], setting.y)
    if setting.loss_fn.reduction == "sum":
        loss = loss / setting.x.shape[0]
    expected = torch.autograd.grad(loss, list(setting.model.parameters()))
    assert_all_close(expected_transform(grads, lambda g: g), list(expected), setting.dtype)


def test_expected_transform_keeps_the_container(setting64):
    grads = setting64.reference()
    names = [name for name, _ in setting64.model.named_parameters()]
    as_list = expected_transform(grads, torch.sign)
    as_tuple = expected_transform(tuple(grads), torch.sign)
    as_dict = expected_transform(dict(zip(names, grads)), torch.sign)
    assert isinstance(as_tuple, tuple) and isinstance(as_dict, dict)
    assert list(as_dict) == names
    for a, b, c in zip(as_list, as_tuple, as_dict.values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    for result, p in zip(as_list, setting64.model.parameters()):
        assert result.shape == p.shape


def test_transform_sees_all_examples_at_once():
    seen = []
    grads = [torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)]
    expected_transform(grads, lambda g: seen.append(g.shape) or g)
    assert seen == [torch.Size([6, 8])]


# The forum's point: E[T(g)], T(E[g]) and E[grad T(f)] differ for a non-linear T.
def test_the_three_orders_differ():
    torch.manual_seed(1)
    model = nn.Linear(2, 1).double()
    x, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    grads = naive_per_example_grads(model, loss_fn, x, y)
    params = list(model.parameters())
    mean_of_square = expected_transform(grads, torch.square)
    square_of_mean = [g.square() for g in expected_transform(grads, lambda g: g)]
    individual = (model(x) - y).square().squeeze(1)  # (n,)
    grad_of_square = torch.autograd.grad(individual.square().mean(), params)
    for a, b, c in zip(mean_of_square, square_of_mean, grad_of_square):
        assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # E[g^2] - E[g]^2 is the variance: the gap is exactly what gradient_variance returns
    for gap, var in zip(
        [a - b for a, b in zip(mean_of_square, square_of_mean)], gradient_variance(grads)
    ):
        assert_close(gap, var)


def _grads64(n=4):
    return [torch.randn(n, 3, 2, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)]


@pytest.mark.parametrize(
    ("T", "error", "match"),
    [
        (lambda g: g.sum(0), ValueError, r"same shape.*never over dim=0"),
        (lambda g: g.norm(dim=1), ValueError, r"same shape"),
        (lambda g: g[:, :3], ValueError, r"same shape"),
        (lambda g: g.tolist(), TypeError, r"must return a torch.Tensor"),
        (lambda g: g.float(), TypeError, r"keep the dtype"),
        (lambda g: g / 0.0, ValueError, r"non-finite.*although their per-example gradients"),
        (lambda g: torch.log(g), ValueError, r"non-finite"),
    ],
    ids=["sum_dim0", "norm", "fewer_columns", "list", "float32", "inf", "log_negative"],
)
def test_bad_transform_is_refused(T, error, match):
    with pytest.raises(error, match=match):
        expected_transform(_grads64(), T)


def test_non_finite_input_is_named_as_the_cause():
    grads = _grads64()
    grads[1][2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows 2\).*already non-finite"):
        expected_transform(grads, lambda g: g)


def test_non_callable_transform_is_refused():
    with pytest.raises(TypeError, match="T must be callable"):
        expected_transform(_grads64(), "square")


@pytest.mark.parametrize(
    ("container", "error", "match"),
    [
        (torch.randn(4, 3), TypeError, r"must be the list returned by goodfellow_backprop"),
        ({1, 2}, TypeError, r"got set"),
        ((g for g in _grads64()), TypeError, r"got generator"),
        ([], ValueError, r"is empty"),
        ({}, ValueError, r"is empty"),
        ([torch.randn(4, 3), "x"], TypeError, r"entry \[1\] must be a torch.Tensor"),
        ({"w": torch.randn(4, 3), "b": 3.0}, TypeError, r"entry b must be a torch.Tensor"),
        ([torch.tensor(1.0)], ValueError, r"scalar"),
        ([torch.randn(4, 3), torch.randn(5)], ValueError, r"holds 5 examples"),
        ([torch.randn(4, 3), torch.randn(4, dtype=torch.float64)], ValueError, r"one dtype"),
        ([torch.randn(0, 3)], ValueError, r"empty \(n = 0\)"),
        ([torch.ones(4, 3, dtype=torch.int64)], TypeError, r"torch.int64 tensor.*floating"),
    ],
    ids=[
        "tensor",
        "set",
        "generator",
        "empty_list",
        "empty_dict",
        "string_entry",
        "float_entry",
        "scalar",
        "batch_mismatch",
        "dtype_mismatch",
        "no_examples",
        "integer",
    ],
)
def test_bad_container_is_refused(container, error, match):
    with pytest.raises(error, match=match):
        expected_transform(container, lambda g: g)
    with pytest.raises(error, match=match):
        gradient_norms(container)
    with pytest.raises(error, match=match):
        gradient_mean(container)


def test_integer_gradients_are_refused_not_averaged_to_zero():
    """An integer mean would use weights 1/n rounded to 0 and return zeros."""
    grads = [torch.ones(4, 3, dtype=torch.int64)]
    for function in (gradient_mean, gradient_variance, gradient_second_moment):
        with pytest.raises(TypeError, match="floating point"):
            function(grads)
    with pytest.raises(TypeError, match="floating point"):
        clipped_mean(grads, 1.0)


# --------------------------------------------------------------------------------------------
# assign_grads and the forum's training loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_forum_loop_steps_along_the_transformed_mean(setting64, as_dict):
    model, lr = setting64.model, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    T = clip_to_norm(0.5)
    expected = loop_mean_of_transform(setting64.reference(), T)

    optimizer.zero_grad()
    y_hat, _, _ = model(setting64.x)
    setting64.loss_fn(y_hat, setting64.y).backward()  # p.grad: the ordinary gradient
    grads = per_example_grads(model, setting64.loss_fn, setting64.x, setting64.y)
    if as_dict:
        grads = dict(zip([name for name, _ in model.named_parameters()], grads))
    assign_grads(model, expected_transform(grads, T))
    optimizer.step()

    for p, p0, g in zip(model.parameters(), before, expected):
        assert_close(p.detach(), p0 - lr * g)


def test_assign_grads_copies_and_replaces():
    layer = nn.Linear(3, 2).double()
    layer(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    new = [torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    assign_grads(layer.parameters(), new)
    new[0].add_(5.0)  # the caller's tensor stays theirs
    assert torch.equal(layer.weight.grad, torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(layer.bias.grad, torch.zeros(2, dtype=torch.float64))


def test_assign_grads_skips_frozen_parameters_of_a_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    grads = [torch.ones_like(p) for p in model.parameters() if p.requires_grad]
    assign_grads(model, grads)
    assert model[0].weight.grad is None and torch.equal(model[1].bias.grad, torch.ones(1))


@pytest.mark.parametrize(
    ("target", "grads", "error", "match"),
    [
        ("model", [torch.zeros(2, 3)], ValueError, r"got 1 gradients for 2 parameters"),
        ("model", [torch.zeros(3, 2), torch.zeros(2)], ValueError, r"shape \(3, 2\).*\(2, 3\)"),
        ("model", [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2)], ValueError, "float64"),
        ("model", [torch.zeros(2, 3), [0.0, 0.0]], TypeError, r"is a list, not a tensor"),
        ("params", {"weight": torch.zeros(2, 3)}, TypeError, r"pass the model"),
        ("model", {"weight": torch.zeros(2, 3)}, ValueError, r"missing \['bias'\]"),
        ("model", {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "x": 1}, ValueError,
         r"unknown \['x'\]"),
        ("model", torch.zeros(2, 3), TypeError, r"list, tuple or dict"),
        ("tensor", [torch.zeros(2, 3)], TypeError, r"single tensor"),
        ("number", [torch.zeros(2, 3)], TypeError, r"nn.Module or an iterable"),
    ],
    ids=["count", "shape", "dtype", "entry", "dict_params", "missing", "unknown", "tensor",
         "single_tensor", "number"],
)  # fmt: skip
def test_assign_grads_refuses_mismatches(target, grads, error, match):
    layer = nn.Linear(3, 2)
    targets = {"model": layer, "params": layer.parameters(), "tensor": layer.weight, "number": 3}
    with pytest.raises(error, match=match):
        assign_grads(targets[target], grads)


# --------------------------------------------------------------------------------------------
# Statistics: factored (never materialized) = materialized = independent references
# --------------------------------------------------------------------------------------------


def test_norms_match_reference_and_per_example_norms(setting):
    reference = setting.reference()
    expected = torch.linalg.vector_norm(flat_rows(reference), dim=1)
    assert_close(gradient_norms(reference), expected, setting.dtype)
    assert_close(gradient_norms(setting.factors()), expected, setting.dtype)
    y_hat, activations, linear_combs = setting.model(setting.x)
    linear_grads = torch.autograd.grad(setting.loss_fn(y_hat, setting.y), linear_combs)
    norms = per_example_norms(activations, linear_grads, setting.loss_fn.reduction)
    assert_close(gradient_norms(setting.factors()), norms, setting.dtype)


@pytest.mark.parametrize("quantile", [0.0, 0.5, 1.0])
def test_clipped_mean_matches_clipping_each_example(setting, quantile):
    reference = setting.reference()
    rows = flat_rows(reference)
    norms = torch.linalg.vector_norm(rows, dim=1)
    max_norm = float(torch.quantile(norms.double(), quantile)) * (1 + 1e-9)
    clipped = [rows[i] * min(1.0, max_norm / float(norms[i])) for i in range(rows.shape[0])]
    expected = unflat(torch.stack(clipped).mean(0), reference)
    assert_all_close(clipped_mean(reference, max_norm), expected, setting.dtype)
    assert_all_close(clipped_mean(setting.factors(), max_norm), expected, setting.dtype)
    transformed = expected_transform(reference, clip_to_norm(max_norm))
    assert_all_close(transformed, expected, setting.dtype)


def test_mean_and_second_moment_match_reference(setting):
    reference = setting.reference()
    factors = setting.factors()
    assert_all_close(gradient_mean(factors), [g.mean(0) for g in reference], setting.dtype)
    expected_moment = [g.square().mean(0) for g in reference]
    assert_all_close(gradient_second_moment(reference), expected_moment, setting.dtype)
    assert_all_close(gradient_second_moment(factors), expected_moment, setting.dtype)


@pytest.mark.parametrize("unbiased", [False, True], ids=["n", "n-1"])
def test_variance_and_trace_match_torch(setting, unbiased):
    reference = setting.reference()
    correction = int(unbiased)
    expected = [torch.var(g, dim=0, correction=correction) for g in reference]
    assert_all_close(gradient_variance(reference, unbiased), expected, setting.dtype)
    # the factored route subtracts two moments: compare at the scale of those moments
    for v, e, m in zip(
        gradient_variance(setting.factors(), unbiased),
        expected,
        gradient_second_moment(reference),
    ):
        tolerance = TOLERANCES[setting.dtype]
        assert torch.all((v - e).abs() <= tolerance["atol"] + tolerance["rtol"] * 4 * m)
    trace = torch.cov(flat_rows(reference).T, correction=correction).trace()
    assert_close(gradient_variance_trace(reference, unbiased), trace, setting.dtype)
    assert_close(gradient_variance_trace(setting.factors(), unbiased), trace, setting.dtype)


def test_noise_scale_matches_its_formula(setting):
    reference = setting.reference()
    rows = flat_rows(reference)
    n = rows.shape[0]
    trace = torch.cov(rows.T, correction=1).trace()  # S, unbiased
    squared_norm = rows.mean(0).square().sum() - trace / n  # |G|^2, unbiased
    for source in (reference, setting.factors()):
        parts = noise_scale_parts(source)
        assert_close(parts[0], trace, setting.dtype)
        assert_close(parts[1], squared_norm, setting.dtype)
        assert_close(gradient_noise_scale(source), trace / squared_norm, setting.dtype)
        plug_in = torch.cov(rows.T, correction=0).trace() / rows.mean(0).square().sum()
        assert_close(gradient_noise_scale(source, unbiased=False), plug_in, setting.dtype)


def test_statistics_of_two_hand_made_gradients():
    """Two examples a and b: every statistic has a closed form."""
    a = torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    grads = [torch.stack([a, b])]
    d = a - b
    assert_close(gradient_variance(grads)[0], d.square() / 4)
    assert_close(gradient_variance(grads, unbiased=True)[0], d.square() / 2)
    assert_close(gradient_variance_trace(grads), d.square().sum() / 4)
    # S = |a-b|^2 / 2 and |G|^2 = |(a+b)/2|^2 - S/2 = a.b
    trace, squared_norm = noise_scale_parts(grads)
    assert_close(trace, d.square().sum() / 2)
    assert_close(squared_norm, a @ b)
    assert_close(gradient_noise_scale(grads), d.square().sum() / (2 * (a @ b)))
    # clipping to |b| leaves b and shortens a to the length of b
    clipped = clipped_mean(grads, float(b.norm()))[0]
    assert_close(clipped, (a / a.norm() * b.norm() + b) / 2)


def test_noise_scale_of_a_single_example_and_of_zero_gradients():
    g = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    # plug-in parts of one example: no spread, |g|^2
    trace, squared_norm = noise_scale_parts([g], unbiased=False)
    assert_close(trace, torch.tensor(0.0, dtype=torch.float64))
    assert_close(squared_norm, torch.tensor(25.0, dtype=torch.float64))
    # equal gradients: no noise at all, B = 0 (finite), with either estimator
    same = [g.expand(2, 2)]
    for unbiased in (True, False):
        assert gradient_noise_scale(same, unbiased).item() == 0.0
    # all-zero gradients: 0/0, refused rather than NaN, in both forms
    A = torch.randn(3, 2, dtype=torch.float64)
    zero_factors = linear_factors(A, torch.zeros(3, 4, dtype=torch.float64))
    for source in ([torch.zeros(3, 2, dtype=torch.float64)], zero_factors):
        for unbiased in (True, False):
            with pytest.raises(ValueError, match="0/0"):
                gradient_noise_scale(source, unbiased)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clipped_mean_refuses_non_finite_gradients(bad):
    """An infinite norm gets weight C/inf = 0 and 0 * inf = NaN: refused, naming the row."""
    grads = [torch.tensor([[1.0, 2.0], [bad, 0.0], [3.0, 4.0]], dtype=torch.float64)]
    A = torch.tensor([[1.0], [bad], [2.0]], dtype=torch.float64)
    factors = linear_factors(A, torch.ones(3, 2, dtype=torch.float64))
    for source in (grads, factors):
        with pytest.raises(ValueError, match=r"1 example\(s\) \(rows 1\) hold NaN or inf"):
            clipped_mean(source, 1.0)
    with pytest.raises(ValueError, match="already non-finite"):
        expected_transform(grads, clip_to_norm(1.0))


def test_unbiased_needs_two_examples():
    grads = [torch.randn(1, 3, dtype=torch.float64)]
    for function in (gradient_variance, gradient_variance_trace, noise_scale_parts):
        with pytest.raises(ValueError, match="at least 2 examples"):
            function(grads, True)
        function(grads, False)  # the plug-in version exists for one example


@pytest.mark.parametrize(
    "max_norm", [0, -1.0, float("nan"), float("inf"), True, "1", None],
    ids=["zero", "negative", "nan", "inf", "bool", "string", "none"],
)  # fmt: skip
def test_bad_clipping_norm_is_refused(max_norm):
    error = ValueError if isinstance(max_norm, float | int) and max_norm is not True else TypeError
    with pytest.raises(error, match="max_norm must be a positive"):
        clip_to_norm(max_norm)
    with pytest.raises(error, match="max_norm must be a positive"):
        clipped_mean(_grads64(), max_norm)


# --------------------------------------------------------------------------------------------
# The factored form for inputs with extra dimensions and layers used twice (the hooks route)
# --------------------------------------------------------------------------------------------


class SequenceNet(nn.Module):
    """Linear layers on (n, T, d) inputs, one of them used twice, a head without bias."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        z1 = self.embed(x)  # (n, T, h)
        h1 = torch.tanh(z1)
        z2 = self.shared(h1)
        h2 = torch.tanh(z2)
        z3 = self.shared(h2)  # second use of the same weights
        pooled = torch.tanh(z3).mean(dim=1)  # (n, h)
        y = self.head(pooled)
        if record is not None:
            record.extend([(x, z1), (h1, z2), (h2, z3), (pooled, y)])
        return y


def sequence_setting(positions: int, reduction: str, dtype=torch.float64, n: int = 6):
    torch.manual_seed(positions)
    model = SequenceNet(4, 16, 3).to(dtype)
    x = torch.randn(n, positions, 4, dtype=dtype)
    y = torch.randn(n, 3, dtype=dtype)
    loss_fn = nn.MSELoss(reduction=reduction)
    record: list = []
    loss = loss_fn(model(x, record), y)
    outputs = [z for _, z in record]
    grad_outputs = torch.autograd.grad(loss, outputs)
    (a1, _), (a2, _), (a3, _), (a4, _) = record
    g1, g2, g3, g4 = grad_outputs
    factors = {
        "embed": linear_factors(a1, g1, True, reduction),
        "shared": linear_factors([a2.detach(), a3.detach()], [g2, g3], True, reduction),
        "head": linear_factors(a4.detach(), g4, False, reduction),
    }
    names = [name for name, _ in model.named_parameters()]
    reference = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    return factors, reference


# positions 1: T = 1 everywhere; 3: Gram matrices (cheaper); 8: materialized (cheaper)
@pytest.mark.parametrize("positions", [1, 3, 8])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_factored_statistics_of_sequence_layers(positions, reduction):
    factors, reference = sequence_setting(positions, reduction)
    rows = flat_rows(list(reference.values()))
    assert_close(gradient_norms(factors), torch.linalg.vector_norm(rows, dim=1))
    max_norm = float(torch.linalg.vector_norm(rows, dim=1).median())
    assert_all_close(clipped_mean(factors, max_norm), clipped_mean(reference, max_norm))
    assert_all_close(gradient_mean(factors), {k: g.mean(0) for k, g in reference.items()})
    moment = {k: g.square().mean(0) for k, g in reference.items()}
    assert_all_close(gradient_second_moment(factors), moment)
    trace = torch.cov(rows.T, correction=1).trace()
    assert_close(gradient_variance_trace(factors, unbiased=True), trace)
    assert_close(noise_scale_parts(factors)[1], noise_scale_parts(reference)[1])


def test_factored_statistics_float32():
    factors, reference = sequence_setting(3, "mean", torch.float32)
    assert_close(
        gradient_norms(factors), gradient_norms(reference), dtype=torch.float32
    )
    assert_all_close(clipped_mean(factors, 0.1), clipped_mean(reference, 0.1), torch.float32)


def test_single_linear_factors_and_dict_naming():
    A = torch.randn(5, 2, 3, dtype=torch.float64)
    G = torch.randn(5, 2, 4, dtype=torch.float64)
    layer = linear_factors(A, G)
    weights = torch.einsum("nto,nti->noi", G, A)
    biases = G.sum(1)
    assert_all_close(gradient_mean(layer), [weights.mean(0), biases.mean(0)])
    assert list(gradient_mean({"block.proj": layer})) == ["block.proj.weight", "block.proj.bias"]
    no_bias = linear_factors(A, G, bias=False)
    assert_close(gradient_norms(no_bias), weights.flatten(1).norm(dim=1))


def test_factors_of_a_single_use_are_views_not_copies(setting64):
    """The factored route's memory is O(n): it keeps the recorded tensors, never copies them.

    A copy of every layer's inputs and output gradients, held for the whole computation, was
    a third of clipped_mean's extra peak memory on a deep narrow MLP.
    """
    y_hat, activations, linear_combs = setting64.model(setting64.x)
    loss = setting64.loss_fn(y_hat, setting64.y)
    linear_grads = torch.autograd.grad(loss, linear_combs)
    factors = mlp_factors([a.detach() for a in activations], linear_grads, "sum")
    for layer, a, g in zip(factors, activations, linear_grads):
        assert layer.inputs.data_ptr() == a.data_ptr()
        assert layer.grad_outputs.data_ptr() == g.data_ptr()
    A = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    layer = linear_factors([A], [torch.randn(5, 2, 3, 6, dtype=torch.float64)])
    assert layer.inputs.shape == (5, 6, 4) and layer.inputs.data_ptr() == A.data_ptr()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda A, G: linear_factors(A, [G]), ValueError, r"both as tensors or both as lists"),
        (lambda A, G: linear_factors([A, A], [G]), ValueError, r"got 2 inputs but 1"),
        (lambda A, G: linear_factors([], []), ValueError, r"inputs is empty"),
        (lambda A, G: linear_factors(A[:, :1], G), ValueError, r"all but the last"),
        (lambda A, G: linear_factors(A, G.float()), ValueError, r"float64.*float32"),
        (lambda A, G: linear_factors(A[:, 0, 0], G[:, 0, 0]), ValueError, r"\(n, \.\.\., features"),
        (lambda A, G: linear_factors(A, G, loss_reduction="max"), ValueError, r"loss_reduction"),
        (lambda A, G: linear_factors([A, "x"], [G, G]), TypeError, r"inputs\[1\] must be"),
        (lambda A, G: gradient_norms([linear_factors(A, G), A]), TypeError, r"mix of"),
        (lambda A, G: gradient_norms([linear_factors(A, G), linear_factors(A[:2], G[:2])]),
         ValueError, r"layer 1 holds 2 examples"),
        (lambda A, G: gradient_norms(LinearFactors(A[:, 0], G, True)), ValueError,
         r"LinearFactors need"),
        (lambda A, G: mlp_factors(A, [G]), TypeError, r"activations must be a list"),
        (lambda A, G: mlp_factors([A[:, 0]], [G[:, 0], G[:, 0]]), ValueError, r"one entry per"),
        (lambda A, G: mlp_factors([A], [G]), ValueError, r"shape \(n, features\)"),
        (lambda A, G: gradient_norms(LinearFactors(A.tolist(), G, True)), TypeError,
         r"layer 0: LinearFactors.inputs must be a floating-point torch.Tensor, got list"),
        (lambda A, G: linear_factors(A.long(), G.long()), TypeError,
         r"inputs must be a floating-point tensor, got torch.int64"),
        (lambda A, G: gradient_mean(LinearFactors(A.long(), G.long(), True)), TypeError,
         r"LinearFactors.inputs must be a floating-point torch.Tensor, got a torch.int64"),
        (lambda A, G: gradient_mean(LinearFactors(A[:0], G[:0], True)), ValueError,
         r"empty \(n = 0\)"),
    ],
    ids=["tensor_and_list", "uses", "no_uses", "positions", "dtype", "rank", "reduction",
         "entry", "mixed", "batch", "raw_factors", "mlp_tensor", "mlp_lengths", "mlp_rank",
         "raw_list", "integer", "raw_integer", "no_examples"],
)  # fmt: skip
def test_bad_factors_are_refused(call, error, match):
    A = torch.randn(5, 2, 3, dtype=torch.float64)
    G = torch.randn(5, 2, 4, dtype=torch.float64)
    with pytest.raises(error, match=match):
        call(A, G)


@pytest.mark.parametrize("positions", [1, 3, 8])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_recorded_factors_match_the_hooks_and_torch_func(positions, reduction):
    _, reference = sequence_setting(positions, reduction)
    torch.manual_seed(positions)
    model = SequenceNet(4, 16, 3).double()
    x = torch.randn(6, positions, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    with goodfellow.PerExampleGradients(model, loss_reduction=reduction) as pe:
        nn.MSELoss(reduction=reduction)(model(x), y).backward()
    factors = recorded_factors(pe)
    assert list(factors) == ["embed", "shared", "head"]
    assert factors["shared"].inputs.shape == (6, 2 * positions, 16)  # both calls, end to end
    assert_close(gradient_norms(factors), gradient_norms(reference))
    assert_close(gradient_norms(factors), gradient_norms(pe.grads))
    assert_all_close(clipped_mean(factors, 0.05), clipped_mean(reference, 0.05))
    assert_all_close(gradient_second_moment(factors), gradient_second_moment(pe.grads))


def test_recorded_factors_drive_the_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    with goodfellow.PerExampleGradients(model, loss_reduction="mean") as pe:
        F.cross_entropy(model(x), y).backward()
    expected = clipped_mean(pe.grads, 0.2)
    assign_grads(model, clipped_mean(recorded_factors(pe), 0.2))
    optimizer.step()
    for p, p0, g in zip(model.parameters(), before, expected.values()):
        assert_close(p.detach(), p0 - 0.5 * g)


def test_recorded_factors_of_a_root_linear_and_edge_cases():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with goodfellow.PerExampleGradients(layer) as pe:
        layer(x).square().sum().backward()
    assert list(gradient_mean(recorded_factors(pe))) == ["weight", "bias"]
    # a frozen bias is left out
    layer.bias.requires_grad_(False)
    with goodfellow.PerExampleGradients(layer) as pe:
        layer(x).square().sum().backward()
    assert list(gradient_mean(recorded_factors(pe))) == ["weight"]
    assert_all_close(gradient_mean(recorded_factors(pe)), expected_transform(pe.grads, lambda g: g))


def test_recorded_factors_of_a_layer_not_called_are_zero():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(2, 2)}).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with goodfellow.PerExampleGradients(model) as pe:
        model["used"](x).square().sum().backward()
    mean = gradient_mean(recorded_factors(pe))
    assert torch.equal(mean["unused.weight"], torch.zeros(2, 2, dtype=torch.float64))
    assert_close(mean["used.weight"], pe.grads["used.weight"].mean(0))


def test_recorded_factors_refuse_what_they_cannot_cover():
    with pytest.raises(TypeError, match="must be a goodfellow.PerExampleGradients"):
        recorded_factors(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="holds no batch"):
        recorded_factors(goodfellow.PerExampleGradients(nn.Linear(2, 2)).attach())
    tied = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}).double()
    tied["b"].weight = tied["a"].weight
    x = torch.randn(3, 2, dtype=torch.float64)
    with goodfellow.PerExampleGradients(tied) as pe:
        (tied["a"](x) + tied["b"](x)).sum().backward()
    with pytest.raises(ValueError, match="shares its weight with 'a'"):
        recorded_factors(pe)
    frozen = nn.Linear(2, 2).double()
    frozen.weight.requires_grad_(False)
    with goodfellow.PerExampleGradients(frozen) as pe:
        frozen(x).sum().backward()
    with pytest.raises(ValueError, match="frozen weight but a trainable bias"):
        recorded_factors(pe)


# --------------------------------------------------------------------------------------------
# Differentiable transformations (create_graph) against torch.func
# --------------------------------------------------------------------------------------------


def torch_func_gradient_of(setting: Setting, statistic) -> list[torch.Tensor]:
    """grad w.r.t. the parameters of statistic(per-example gradients from vmap(grad))."""
    model, loss_fn = setting.model, setting.loss_fn
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(p, x, y):  # example i's own loss L_i: the batch loss on a batch of one
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),))[0], y.unsqueeze(0))

    def objective(p):
        per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(p, setting.x, setting.y)
        return statistic([per_example[name] for name in names])

    gradient = grad(objective)(params)
    return [gradient[name] for name in names]


def differentiable_grads(setting: Setting) -> list[torch.Tensor]:
    model, loss_fn = setting.model, setting.loss_fn
    return per_example_grads(model, loss_fn, setting.x, setting.y, create_graph=True)


def smooth_clip(g: torch.Tensor, max_norm: float = 0.4) -> torch.Tensor:
    return g * max_norm / torch.sqrt(max_norm**2 + g.square().sum(1, keepdim=True))


def test_gradient_of_mean_squared_norm(setting):
    grads = differentiable_grads(setting)
    value = sum(t.sum() for t in expected_transform(grads, torch.square))
    actual = torch.autograd.grad(value, list(setting.model.parameters()))
    expected = torch_func_gradient_of(setting, lambda g: flat_rows(g).square().sum(1).mean())
    assert_all_close(list(actual), expected, setting.dtype)


def test_gradient_of_smooth_clipped_mean(setting):
    directions = [torch.randn_like(p) for p in setting.model.parameters()]
    grads = differentiable_grads(setting)
    mean = expected_transform(grads, smooth_clip)
    value = sum((d * m).sum() for d, m in zip(directions, mean))
    actual = torch.autograd.grad(value, list(setting.model.parameters()))

    def statistic(g):
        clipped = unflat(smooth_clip(flat_rows(g)).mean(0), g)
        return sum((d * c).sum() for d, c in zip(directions, clipped))

    assert_all_close(list(actual), torch_func_gradient_of(setting, statistic), setting.dtype)


def test_factored_statistics_are_differentiable(setting64):
    factors = setting64.factors(create_graph=True)
    norms = gradient_norms(factors)
    directions = [torch.randn_like(p) for p in setting64.model.parameters()]
    max_norm = float(norms.detach().mean())  # clips some examples, and sits on no example's kink
    clipped = clipped_mean(factors, max_norm)
    value = norms.square().mean() + sum((d * c).sum() for d, c in zip(directions, clipped))
    actual = torch.autograd.grad(value, list(setting64.model.parameters()))

    def statistic(g):
        rows = flat_rows(g)
        norms = rows.norm(dim=1, keepdim=True)
        clipped = unflat((rows * torch.clamp(max_norm / norms, max=1.0)).mean(0), g)
        return rows.square().sum(1).mean() + sum(
            (d * c).sum() for d, c in zip(directions, clipped)
        )

    assert_all_close(list(actual), torch_func_gradient_of(setting64, statistic))


@pytest.mark.parametrize("max_norm", [0.5, 1e-200], ids=["C=0.5", "C^2_underflows"])
def test_clipped_mean_differentiates_through_a_zero_gradient(max_norm):
    """An example with g_i = 0 (inside the ball) has factor 1 and contributes no NaN.

    The clipped mean is (1/n) sum_i g_i min(1, C/||g_i||); near g_i = 0 the factor is
    constantly 1, so the derivative is that of the plain mean there. Reference: the same
    function written with torch.linalg.vector_norm, whose derivative at 0 is 0.
    """
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(4, 1, 3, dtype=torch.float64, generator=generator)
    G = torch.randn(4, 1, 2, dtype=torch.float64, generator=generator)
    A[1], G[2] = 0.0, 0.0  # example 1: zero weight gradient; example 2: zero gradient
    A.requires_grad_(True)
    G.requires_grad_(True)
    directions = [torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]

    def value(grads):
        return sum((d * g).sum() for d, g in zip(directions, grads))

    def per_example():
        return [G[:, 0, :, None] * A[:, 0, None, :], G[:, 0]]  # (n, 2, 3), (n, 2)

    reference = value(expected_transform(per_example(), clip_to_norm(max_norm)))
    expected = torch.autograd.grad(reference, (A, G))
    for source in (LinearFactors(A, G, True), per_example()):
        actual = torch.autograd.grad(value(clipped_mean(source, max_norm)), (A, G))
        assert_all_close(actual, expected)


def test_gradient_norms_differentiate_through_a_zero_gradient():
    """Derivative 0 at g_i = 0, the subgradient of torch.linalg.vector_norm, not NaN."""
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(4, 1, 3, dtype=torch.float64, generator=generator)
    G = torch.randn(4, 1, 2, dtype=torch.float64, generator=generator)
    G[2] = 0.0  # example 2: zero gradient
    A.requires_grad_(True)
    G.requires_grad_(True)
    weights = torch.randn(4, dtype=torch.float64, generator=generator)
    per_example = torch.cat([(G[:, 0, :, None] * A[:, 0, None, :]).flatten(1), G[:, 0]], 1)
    reference = weights @ torch.linalg.vector_norm(per_example, dim=1)
    expected = torch.autograd.grad(reference, (A, G))
    sources = (
        lambda: LinearFactors(A, G, True),
        lambda: [G[:, 0, :, None] * A[:, 0, None, :], G[:, 0]],  # (n, 2, 3), (n, 2)
    )
    for source in sources:
        norms = gradient_norms(source())
        assert_close(norms.detach(), torch.linalg.vector_norm(per_example, dim=1).detach())
        assert_all_close(torch.autograd.grad(weights @ norms, (A, G)), expected)


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3
)


@given(n=st.integers(1, 7), shapes=shapes, seed=st.integers(0, 2**16), scale=st.floats(0.01, 10))
def test_properties_of_materialized_statistics(n, shapes, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, *shape, generator=generator, dtype=torch.float64) for shape in shapes]
    rows = flat_rows(grads)
    # the identity transformation gives the mean
    assert_all_close(expected_transform(grads, lambda g: g), [g.mean(0) for g in grads])
    # the clipped mean never exceeds C (triangle inequality) and is the mean when C >= all norms
    max_norm = scale * float(rows.norm(dim=1).mean())
    clipped = flat_rows([c.unsqueeze(0) for c in clipped_mean(grads, max_norm)])
    assert float(clipped.norm()) <= max_norm * (1 + 1e-12)
    big = 2 * float(rows.norm(dim=1).max()) + 1
    assert_all_close(clipped_mean(grads, big), [g.mean(0) for g in grads])
    # variance: non-negative, sums to the trace, trace = mean |g|^2 - |mean|^2
    variance = flat_rows([v.unsqueeze(0) for v in gradient_variance(grads)])
    assert bool((variance >= 0).all())
    trace = gradient_variance_trace(grads)
    assert_close(trace, variance.sum())
    expected = rows.square().sum(1).mean() - rows.mean(0).square().sum()
    torch.testing.assert_close(trace, expected, rtol=1e-9, atol=1e-9 * float(rows.square().sum()))


@given(
    n=st.integers(1, 5),
    positions=st.integers(1, 6),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    uses=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factored_equals_materialized(n, positions, d_in, d_out, uses, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(n, positions, d_in, generator=generator, dtype=torch.float64)
        for _ in range(uses)
    ]
    outs = [
        torch.randn(n, positions, d_out, generator=generator, dtype=torch.float64)
        for _ in range(uses)
    ]
    layer = linear_factors(inputs, outs, bias)
    # the per-example gradients, written out by a loop over examples and uses
    weight = torch.stack(
        [sum(outs[u][i].T @ inputs[u][i] for u in range(uses)) for i in range(n)]
    )  # (n, d_out, d_in)
    materialized = [weight] + ([sum(o.sum(1) for o in outs)] if bias else [])
    assert_close(gradient_norms(layer), gradient_norms(materialized))
    assert_all_close(gradient_second_moment(layer), gradient_second_moment(materialized))
    assert_all_close(clipped_mean(layer, 1.0), clipped_mean(materialized, 1.0))
    scale = float(flat_rows(materialized).square().sum()) + 1e-300
    torch.testing.assert_close(
        gradient_variance_trace(layer),
        gradient_variance_trace(materialized),
        rtol=1e-10,
        atol=1e-12 * scale,
    )


# --------------------------------------------------------------------------------------------
# CABS
# --------------------------------------------------------------------------------------------


def cabs_problem(seed: int = 0, n_data: int = 64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_data, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n_data,), generator=generator)
    torch.manual_seed(seed)
    model = MLP(5, [6], 3, activation=torch.tanh).double()
    return model, x, y


def cabs_batch(model, x, y):
    """Per-example losses and the factored per-example gradients of one batch."""
    y_hat, activations, linear_combs = model(x)
    losses = F.cross_entropy(y_hat, y, reduction="none")
    linear_grads = torch.autograd.grad(losses.sum(), linear_combs)
    return losses, mlp_factors([a.detach() for a in activations], linear_grads)


@pytest.mark.parametrize("route", ["factored", "list", "dict"])
@pytest.mark.parametrize(("rounding", "unbiased"), [("ceil", False), ("round", True)])
def test_cabs_follows_the_reference_recurrence(route, rounding, unbiased):
    """CABS against a plain re-statement of the reference algorithm on naive gradients."""
    lr, bounds, decay = 2.0, (2, 40), 0.9
    model, x, y = cabs_problem(n_data=80)
    twin, _, _ = cabs_problem(n_data=80)
    params = model.named_parameters() if route == "dict" else model.parameters()
    cabs = CABS(params, lr, bounds, decay, initial_batch_size=4, rounding=rounding,
                unbiased=unbiased)  # fmt: skip
    names = [name for name, _ in model.named_parameters()]
    variance_avg, loss_avg, size, start, sizes = 0.0, 1.0, 4, 0, []
    for _ in range(12):
        xb, yb = x[start : start + size], y[start : start + size]
        start = (start + size) % 32
        # the reference: naive per-example gradients of the twin model, scalar recurrences
        reference = naive_per_example_grads(twin, nn.CrossEntropyLoss(reduction="sum"), xb, yb)
        rows = flat_rows(reference)
        xi = float(rows.var(dim=0, correction=int(unbiased)).sum())
        loss = float(F.cross_entropy(twin(xb)[0], yb).detach())
        variance_avg = decay * variance_avg + (1 - decay) * xi
        loss_avg = decay * loss_avg + (1 - decay) * loss
        raw = lr * variance_avg / loss_avg
        size = min(max(math.ceil(raw) if rounding == "ceil" else round(raw), bounds[0]), bounds[1])
        sizes.append(size)
        with torch.no_grad():
            for p, g in zip(twin.parameters(), reference):
                p -= lr * g.mean(0)
        # CABS on the same batch
        losses, factors = cabs_batch(model, xb, yb)
        if route == "factored":
            source = factors
        else:
            source = per_example_grads(model, nn.CrossEntropyLoss(reduction="sum"), xb, yb)
            source = dict(zip(names, source)) if route == "dict" else source
        assert cabs.step(losses, source) == size == cabs.batch_size
        assert cabs.last_variance == pytest.approx(xi, rel=1e-10)
        assert cabs.last_loss == pytest.approx(loss, rel=1e-12)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p.detach(), q.detach())
    assert any(2 < size < 40 for size in sizes), "the rule should act between its bounds"


def test_cabs_writes_the_mean_gradient_and_takes_an_sgd_step():
    model, x, y = cabs_problem()
    before = [p.detach().clone() for p in model.parameters()]
    cabs = CABS(model.parameters(), lr=0.3)
    losses, factors = cabs_batch(model, x[:10], y[:10])
    cabs.step(losses, factors)
    model_again, _, _ = cabs_problem()
    expected = torch.autograd.grad(
        F.cross_entropy(model_again(x[:10])[0], y[:10]), list(model_again.parameters())
    )
    for p, p0, g in zip(model.parameters(), before, expected):
        assert_close(p.grad, g)
        assert_close(p.detach(), p0 - 0.3 * g)


@pytest.mark.parametrize(
    ("lr", "rounding", "bounds", "expected"),
    [
        (20.4, "ceil", (1, 100), 21),
        (20.4, "round", (1, 100), 20),
        (2.5, "round", (1, 100), 2),  # half to even, like tf.round
        (3.5, "round", (1, 100), 4),
        (20.4, "ceil", (30, 100), 30),
        (20.4, "ceil", (1, 10), 10),
        (1e300, "ceil", (1, 10), 10),
    ],
)
def test_cabs_rule_rounds_and_clips(lr, rounding, bounds, expected):
    """Two examples a, b: tr Sigma = |a - b|^2 / 4 = 1 and loss 1, so the raw size is lr."""
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cabs = CABS([p], lr, bounds, decay=0.0, rounding=rounding)
    grads = [torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)]
    losses = torch.tensor([0.5, 1.5], dtype=torch.float64)
    assert cabs.step(losses, grads) == expected


def test_cabs_running_averages_start_from_the_reference_values():
    """xi_avg starts at 0 and L_avg at 1: the first size is lr * (1-mu) xi / (mu + (1-mu) L)."""
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cabs = CABS([p], 1000.0, (1, 10**6), decay=0.95)
    assert cabs.batch_size == 1
    grads = [torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)]  # xi = 1
    losses = torch.tensor([3.0, 3.0], dtype=torch.float64)
    assert cabs.step(losses, grads) == math.ceil(1000 * 0.05 / (0.95 + 0.05 * 3))


def test_cabs_state_dict_round_trip():
    model, x, y = cabs_problem()
    cabs = CABS(model.parameters(), lr=0.5, bounds=(2, 64), initial_batch_size=8)
    for start in (0, 8, 16):
        cabs.step(*cabs_batch(model, x[start : start + 8], y[start : start + 8]))
    saved = cabs.state_dict()
    twin = CABS(model.parameters(), lr=0.5, bounds=(2, 64))
    twin.load_state_dict(saved)
    assert twin.batch_size == cabs.batch_size and twin.state["cabs"] == cabs.state["cabs"]
    snapshot = [p.detach().clone() for p in model.parameters()]
    cabs.step(*cabs_batch(model, x[:8], y[:8]))
    assert saved["state"]["cabs"] == twin.state["cabs"] != cabs.state["cabs"]  # copies
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)
    twin.step(*cabs_batch(model, x[:8], y[:8]))
    assert twin.state["cabs"] == cabs.state["cabs"]


def test_cabs_reads_a_changed_learning_rate():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cabs = CABS([p], 1.0, (1, 100), decay=0.0)
    cabs.param_groups[0]["lr"] = 7.0
    grads = [torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)]
    assert cabs.step(torch.ones(2, dtype=torch.float64), grads) == 7
    assert_close(p.detach(), torch.tensor([-7.0, 0.0], dtype=torch.float64))
    cabs.param_groups[0]["lr"] = -0.5  # lr = 0 is allowed (a warm-up starts there)
    with pytest.raises(ValueError, match="lr must be a non-negative"):
        cabs.step(torch.ones(2, dtype=torch.float64), grads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": float("inf")}, ValueError, r"lr must be a non-negative finite number, got inf"),
        ({"lr": -0.1}, ValueError, r"lr must be a non-negative"),
        ({"lr": float("nan")}, ValueError, r"lr must be a non-negative"),
        ({"lr": True}, TypeError, r"lr must be a non-negative number"),
        ({"lr": 0.1, "bounds": (64, 16)}, ValueError, r"out of order.*64 > max_batch_size 16"),
        ({"lr": 0.1, "bounds": (0, 16)}, ValueError, r"at least 1"),
        ({"lr": 0.1, "bounds": (16,)}, TypeError, r"pair"),
        ({"lr": 0.1, "bounds": (16.0, 32)}, TypeError, r"two integers"),
        ({"lr": 0.1, "decay": 1.0}, ValueError, r"decay must be a number in \[0, 1\)"),
        ({"lr": 0.1, "decay": -0.5}, ValueError, r"decay"),
        ({"lr": 0.1, "initial_batch_size": 4}, ValueError, r"outside the bounds"),
        ({"lr": 0.1, "initial_batch_size": 16.0}, TypeError, r"initial_batch_size must be"),
        ({"lr": 0.1, "rounding": "floor"}, ValueError, r"rounding must be"),
    ],
    ids=["lr_inf", "lr_negative", "lr_nan", "lr_bool", "bounds_order", "bounds_zero",
         "bounds_single", "bounds_float", "decay_one", "decay_negative", "initial",
         "initial_float", "rounding"],
)  # fmt: skip
def test_cabs_refuses_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        CABS([nn.Parameter(torch.zeros(2))], **kwargs)


def test_cabs_refuses_several_parameter_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="single parameter group, got 2"):
        CABS([{"params": [a]}, {"params": [b]}], lr=0.1)


def _two_example_grads():
    return [torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)]


@pytest.mark.parametrize(
    ("losses", "grads", "error", "match"),
    [
        ([1.0, 1.0], _two_example_grads(), TypeError, r"losses must be a tensor"),
        (torch.ones(2, 1), _two_example_grads(), ValueError, r"shape \(n,\).*reduction='none'"),
        (torch.ones(0), _two_example_grads(), ValueError, r"shape \(n,\)"),
        (torch.tensor([1.0, -0.5]), _two_example_grads(), ValueError, r"non-negative.*-0.5"),
        (torch.tensor([1.0, float("nan")]), _two_example_grads(), ValueError, r"NaN or inf"),
        (torch.ones(3), _two_example_grads(), ValueError, r"3 examples but the gradients 2"),
        (torch.ones(2), {"p": _two_example_grads()[0]}, TypeError, r"named_parameters"),
        (torch.ones(2), [torch.zeros(2, 3)], ValueError, r"shape \(3,\)"),
        (torch.ones(2), "grads", TypeError, r"per_example_grads must be"),
    ],
    ids=["list_losses", "2d_losses", "no_losses", "negative", "nan", "batch_mismatch",
         "dict_without_names", "shape", "string"],
)  # fmt: skip
def test_cabs_step_refuses_bad_input(losses, grads, error, match):
    cabs = CABS([nn.Parameter(torch.zeros(2, dtype=torch.float64))], 1.0, (1, 10))
    if isinstance(losses, torch.Tensor):
        losses = losses.double()
    with pytest.raises(error, match=match):
        cabs.step(losses, grads)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cabs_refuses_non_finite_gradients_and_changes_nothing(bad):
    """A NaN in the running variance would stay there and pin every later batch size."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cabs = CABS([param], 1.0, (1, 10))
    grads = [torch.tensor([[1.0, bad], [0.0, 1.0]], dtype=torch.float64)]
    with pytest.raises(ValueError, match="gradients hold NaN or inf"):
        cabs.step(torch.ones(2, dtype=torch.float64), grads)
    state = cabs.state["cabs"]
    assert (state["steps"], state["variance_avg"], state["loss_avg"]) == (0, 0.0, 1.0)
    assert torch.equal(param.detach(), torch.zeros(2, dtype=torch.float64)) and param.grad is None


def test_cabs_refused_gradients_leave_the_running_averages_alone():
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    cabs = CABS([param], 1.0, (1, 10))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        cabs.step(torch.ones(2, dtype=torch.float64), [torch.randn(2, 3, dtype=torch.float64)])
    state = cabs.state["cabs"]
    assert (state["steps"], state["variance_avg"], state["loss_avg"]) == (0, 0.0, 1.0)
    assert math.isnan(state["variance"]) and math.isnan(state["loss"])


def test_cabs_unbiased_needs_two_examples():
    # bounds of at least 2 (1 is refused at construction); a batch of 1 passed anyway is refused
    cabs = CABS([nn.Parameter(torch.zeros(2, dtype=torch.float64))], 1.0, (2, 10), unbiased=True)
    with pytest.raises(ValueError, match="at least 2 examples"):
        cabs.step(torch.ones(1, dtype=torch.float64), [torch.zeros(1, 2, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------
# Batches of the size CABS asks for
# --------------------------------------------------------------------------------------------


@given(
    num_examples=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_sampler_properties(num_examples, sizes, seed):
    asked = iter(sizes)
    sampler = AdaptiveBatchSampler(
        num_examples, lambda: next(asked), generator=torch.Generator().manual_seed(seed)
    )
    stream: list[int] = []
    for size, batch in zip(sizes, sampler):  # sizes first: stop before asking again
        assert len(batch) == min(size, num_examples)  # the size asked for, capped at the data
        assert len(set(batch)) == len(batch)  # distinct examples
        stream.extend(batch)
        assert sampler.examples_seen == len(stream)
    for start in range(0, len(stream) - num_examples + 1, num_examples):
        # every pass is a permutation of the data
        assert sorted(stream[start : start + num_examples]) == list(range(num_examples))


def test_sampler_follows_cabs_and_stops_after_the_epochs():
    model, x, y = cabs_problem(n_data=64)
    cabs = CABS(model.parameters(), lr=0.5, bounds=(4, 64))
    sizes_asked, sizes_drawn = [], []
    generator = torch.Generator().manual_seed(0)
    for xb, yb in adaptive_batches((x, y), cabs, epochs=3, generator=generator):
        sizes_drawn.append(xb.shape[0])
        assert yb.shape[0] == xb.shape[0]
        sizes_asked.append(cabs.step(*cabs_batch(model, xb, yb)))
    assert sizes_drawn[0] == 4 and sizes_drawn[1:] == sizes_asked[:-1]
    assert 3 * 64 <= sum(sizes_drawn) < 3 * 64 + sizes_drawn[-1]


def test_adaptive_batches_keep_rows_together_and_are_reproducible():
    x = torch.arange(10.0).unsqueeze(1)
    labels = torch.arange(10)
    dataset = torch.utils.data.TensorDataset(x, labels)
    runs = [
        list(adaptive_batches(dataset, 3, epochs=2, generator=torch.Generator().manual_seed(5)))
        for _ in range(2)
    ]
    for (xb, yb), (_, yc) in zip(*runs):
        assert torch.equal(xb[:, 0].long(), yb) and torch.equal(yb, yc)
    assert sum(len(yb) for _, yb in runs[0]) == 21


def test_sampler_works_as_a_dataloader_batch_sampler():
    dataset = torch.utils.data.TensorDataset(torch.arange(12.0))
    sampler = AdaptiveBatchSampler(12, 5, epochs=1, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batches = [b[0] for b in loader]
    assert [len(b) for b in batches] == [5, 5, 5]
    assert sorted(torch.cat(batches)[:12].long().tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 4), ValueError, r"num_examples must be a positive integer"),
        ((True, 4), ValueError, r"num_examples"),
        ((10, 0), ValueError, r"batch size must be a positive integer, got 0"),
        ((10, True), TypeError, r"batch_size must be an int"),
        ((10, "16"), TypeError, r"batch_size must be an int"),
        ((10, 4, 0), ValueError, r"epochs must be a positive number"),
        ((10, 4, float("nan")), ValueError, r"epochs"),
    ],
    ids=["no_examples", "bool_examples", "zero_batch", "bool_batch", "string_batch",
         "zero_epochs", "nan_epochs"],
)  # fmt: skip
def test_sampler_refuses_bad_settings(args, error, match):
    with pytest.raises(error, match=match):
        AdaptiveBatchSampler(*args)


def test_sampler_refuses_a_bad_size_when_drawing():
    sampler = AdaptiveBatchSampler(10, lambda: -3)
    with pytest.raises(ValueError, match="positive integer, got -3"):
        next(iter(sampler))


@pytest.mark.parametrize(
    ("dataset", "error", "match"),
    [
        ([torch.zeros(4), "y"], TypeError, r"TensorDataset or a tuple of tensors"),
        (torch.zeros(4, 2), TypeError, r"TensorDataset or a tuple"),
        ((torch.zeros(4), torch.zeros(5)), ValueError, r"share their first"),
        ((), ValueError, r"holds no tensors"),
    ],
    ids=["string", "tensor", "lengths", "empty"],
)
def test_adaptive_batches_refuse_bad_data(dataset, error, match):
    with pytest.raises(error, match=match):
        next(adaptive_batches(dataset, 2))


def test_public_names_are_exported():
    for name in ["expected_transform", "assign_grads", "CABS", "AdaptiveBatchSampler"]:
        assert name in goodfellow.__all__ and hasattr(goodfellow, name)


@pytest.mark.parametrize(
    "mangle, error, message",
    [
        (lambda acts, grads: (acts[:-1], grads), ValueError, "one entry per linear layer"),
        (lambda acts, grads: ([acts[0][0], *acts[1:]], grads), ValueError, r"\(n, features\)"),
        (lambda acts, grads: (grads, acts), ValueError, "do not describe one chain"),
        (lambda acts, grads: (acts[0], grads), TypeError, "list or tuple of tensors"),
    ],
    ids=["lengths", "rank", "swapped", "not-a-list"],
)
def test_mlp_factors_refuses_lists_that_are_not_one_mlp(mangle, error, message):
    model = goodfellow.MLP(3, [4, 5], 2).double()
    prediction, activations, linear_combs = model(torch.randn(6, 3, dtype=torch.float64))
    linear_grads = torch.autograd.grad(prediction.square().sum(), linear_combs)
    with pytest.raises(error, match=message):
        goodfellow.mlp_factors(*mangle(list(activations), list(linear_grads)))


@pytest.mark.parametrize(
    "call",
    [
        lambda a, g: goodfellow.linear_factors(a, [g] if isinstance(a, list) else g),
        lambda a, g: goodfellow.kfac_factors(a, g),
    ],
    ids=["linear_factors", "kfac_factors"],
)
@pytest.mark.parametrize(
    "a, g, message, error",
    [
        ([[1.0, 2.0]], torch.ones(3, 4), "inputs must be a torch.Tensor, got list", TypeError),
        (torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 4), "inputs must be a floating-point "
         "tensor, got torch.int64: convert it with .float()", TypeError),
        (torch.ones(3), torch.ones(3),
         r"inputs must have shape \(n, ..., features\), got shape \(3,\)", ValueError),
    ],
    ids=["list", "integer", "one_dimension"],
)  # fmt: skip
def test_a_layers_recorded_tensors_are_checked_with_one_wording(call, a, g, message, error):
    with pytest.raises(error, match=message):
        call(a, g)


def test_the_use_of_a_layer_with_bad_input_is_named():
    good, bad = torch.ones(3, 2), torch.ones(3, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a floating-point tensor"):
        goodfellow.linear_factors([good, bad], [torch.ones(3, 4)] * 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda out: goodfellow.batched_outer(torch.ones(3, 4), torch.ones(3, 2), out=out),
        lambda out: goodfellow.goodfellow_backprop(
            [torch.ones(3, 2)], [torch.ones(3, 4)], out=[out, torch.empty(3, 4)]
        ),
    ],
    ids=["batched_outer", "goodfellow_backprop"],
)
def test_out_buffers_are_checked_with_one_wording(call):
    with pytest.raises(TypeError, match=r"must be a torch.Tensor, got list"):
        call([0.0])
    with pytest.raises(ValueError, match=r"must be a torch.float32 tensor of shape \(3, 4, 2\)"):
        call(torch.empty(3, 2, 4))


F32, F64 = torch.ones(3, 2), torch.ones(3, 4, dtype=torch.float64)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: goodfellow.linear_factors(F32, F64), ("inputs", "grad_outputs")),
        (lambda: goodfellow.kfac_factors(F32, F64), ("inputs", "grad_outputs")),
        (lambda: goodfellow.batched_outer(F64, F32), ("grad_outputs", "inputs")),
        (lambda: goodfellow.goodfellow_backprop([F32], [F64]),
         ("layer 1: activations", "linear_grads")),
        (lambda: goodfellow.gradient_norms(
            goodfellow.LinearFactors(F32[:, None], F64[:, None], True)),
         ("layer 0: LinearFactors.inputs", "grad_outputs")),
        (lambda: goodfellow.gradient_norms([F32, F64]),
         ("per_example_grads entry [1]", "entry [0]")),
    ],
    ids=["linear_factors", "kfac_factors", "batched_outer", "goodfellow_backprop",
         "factors_source", "materialized_source"],
)  # fmt: skip
def test_mixed_dtypes_are_refused_with_one_wording(call, names):
    first, second = names
    first_dtype, second_dtype = ("float64", "float32") if first in (
        "grad_outputs", "per_example_grads entry [1]"
    ) else ("float32", "float64")  # fmt: skip
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(first)} is torch\.{first_dtype} on cpu but {re.escape(second)} is "
        rf"torch\.{second_dtype} on cpu; ",
    ):
        call()
