"""private_mean, the DP-SGD update, and the accounting tutorial 11 relies on.

Every number is checked against a hand-written reference: per-example gradients from a naive
loop (one backward per example), clipped and summed in the test itself; the noise against its
distribution (fixed seeds, stated tolerances); Opacus' accountant against the closed forms of the
Gaussian mechanism. The distributed case runs two gloo processes on 127.0.0.1, started by the
test with a timeout (this file is also their entry point: ``python -m tests.test_privacy``).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import goodfellow as gf
from goodfellow.privacy import private_mean
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]
DELTA = 1e-5


# --------------------------------------------------------------------------------------------
# A small model, its per-example gradients by a naive loop, and every kind of source
# --------------------------------------------------------------------------------------------


def make_model(seed: int = 0, widths: tuple[int, ...] = (4, 5, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        if k > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers).double()


def make_batch(n: int, seed: int = 1, d_in: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator, dtype=torch.float64) * 2
    y = torch.randint(classes, (n,), generator=generator)
    return x, y


def naive_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One backward per example: ``[(n, *p.shape) for p in model.parameters()]``."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        prediction = model(xi[None])
        if isinstance(prediction, tuple):  # goodfellow.MLP: (prediction, activations, ...)
            prediction = prediction[0]
        loss = F.cross_entropy(prediction, yi[None], reduction="sum")
        rows.append(torch.autograd.grad(loss, params))
    return [torch.stack([row[k] for row in rows]) for k in range(len(params))]


def reference_clipped_sum(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    n = grads[0].shape[0]
    flat = torch.cat([g.reshape(n, -1) for g in grads], dim=1)  # (n, P)
    norms = flat.norm(dim=1)  # (n,)
    factors = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))  # (n,)
    return [(g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for g in grads]


def recorded(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> gf.PerExampleGradients:
    with gf.PerExampleGradients(model, loss_reduction="mean") as pe:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return pe


def sources(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """Every kind of source private_mean takes, for one batch (all in parameter order)."""
    pe = recorded(model, x, y)
    factors = gf.recorded_factors(pe)
    return {
        "materialized list": naive_grads(model, x, y),
        "materialized tuple": tuple(naive_grads(model, x, y)),
        "materialized dict": dict(pe.grads),
        "factored dict": factors,
        "factored list": list(factors.values()),
    }


SOURCE_KINDS = [
    "materialized list",
    "materialized tuple",
    "materialized dict",
    "factored dict",
    "factored list",
]


def as_list(result) -> list[torch.Tensor]:
    return list(result.values()) if isinstance(result, dict) else list(result)


def assert_all_close(actual, expected, **tolerance) -> None:
    actual, expected = as_list(actual), as_list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **(tolerance or F64))


# --------------------------------------------------------------------------------------------
# Without noise: the clipped sum divided by B
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("expected_batch_size", [None, 5.5, 12])
@pytest.mark.parametrize("max_norm", [0.05, 0.5, 100.0])  # all, some, no examples clipped
def test_without_noise_it_is_the_clipped_sum_over_b(kind, expected_batch_size, max_norm):
    model = make_model()
    x, y = make_batch(7)
    source = sources(model, x, y)[kind]
    result = private_mean(source, max_norm, 0.0, expected_batch_size)
    divisor = 7 if expected_batch_size is None else expected_batch_size
    reference = [s / divisor for s in reference_clipped_sum(naive_grads(model, x, y), max_norm)]
    assert_all_close(result, reference)
    # and the form of the same statement: clipped_mean * n / B, in its layout
    mean = gf.clipped_mean(source, max_norm)
    assert type(result) is type(mean)
    if isinstance(mean, dict):
        assert list(result) == list(mean)
    assert_all_close(result, [m * 7 / divisor for m in as_list(mean)])


def test_a_single_layer_gives_weight_and_bias():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x, y = make_batch(6)
    factors = gf.recorded_factors(recorded(layer, x, y))[""]  # the root module is the Linear
    result = private_mean(factors, 0.3, 0.0, 4.0)
    assert isinstance(result, list)
    reference = [s / 4.0 for s in reference_clipped_sum(naive_grads(layer, x, y), 0.3)]
    assert_all_close(result, reference)


def test_mlp_factors_and_goodfellow_backprop_agree_with_the_naive_loop():
    mlp = gf.MLP(4, [5], 3, activation=torch.tanh).double()
    x, y = make_batch(8)
    prediction, activations, linear_combs = mlp(x)
    loss = F.cross_entropy(prediction, y, reduction="sum")
    linear_grads = torch.autograd.grad(loss, linear_combs)
    factors = gf.mlp_factors([a.detach() for a in activations], linear_grads)
    materialized = gf.goodfellow_backprop(activations, linear_grads, "sum")
    reference = [s / 6.0 for s in reference_clipped_sum(naive_grads(mlp, x, y), 1.0)]
    for source in (factors, materialized):
        assert_all_close(private_mean(source, 1.0, 0.0, 6.0), reference)


@given(
    n=st.integers(0, 6),
    max_norm=st.floats(0.01, 10.0),
    divisor=st.floats(0.5, 50.0),
    seed=st.integers(0, 2**16),
)
def test_without_noise_on_random_per_example_gradients(n, max_norm, divisor, seed):
    generator = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(n, 3, 2, generator=generator, dtype=torch.float64),
        torch.randn(n, 3, generator=generator, dtype=torch.float64),
    ]
    result = private_mean(grads, max_norm, 0.0, divisor)
    if n == 0:
        reference = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    else:
        reference = [s / divisor for s in reference_clipped_sum(grads, max_norm)]
    assert_all_close(result, reference)


# --------------------------------------------------------------------------------------------
# The noise
# --------------------------------------------------------------------------------------------


def test_noise_has_mean_0_and_std_sigma_c_over_b_per_entry():
    from scipy import stats

    model = make_model()
    x, y = make_batch(7)
    source = gf.recorded_factors(recorded(model, x, y))
    sigma, max_norm, divisor, draws = 1.3, 0.4, 5.5, 4000

    def flat_update(noise_multiplier, generator=None):
        update = private_mean(source, max_norm, noise_multiplier, divisor, generator=generator)
        return torch.cat([t.detach().flatten() for t in as_list(update)])  # (P,)

    clean = flat_update(0.0)
    generator = torch.Generator().manual_seed(2024)
    noise = torch.stack([flat_update(sigma, generator) - clean for _ in range(draws)])  # (K, P)
    target = sigma * max_norm / divisor
    standardized = noise / target  # N(0, 1) entries if the noise is right
    # Tolerances: 5 standard errors of each estimate (mean: 1/sqrt(K); std: 1/sqrt(2K);
    # correlation: 1/sqrt(K)), over P = 43 entries and 903 pairs: a right noise fails with
    # probability below 1e-3, a noise off by 6% in scale or shared across entries fails.
    entry_means = standardized.mean(dim=0)  # (P,)
    entry_stds = standardized.std(dim=0)  # (P,)
    assert entry_means.abs().max() < 5 / math.sqrt(draws)
    assert (entry_stds - 1).abs().max() < 5 / math.sqrt(2 * draws)
    correlation = torch.corrcoef(standardized.T)  # (P, P)
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    assert off_diagonal.abs().max() < 5 / math.sqrt(draws)
    # and Gaussian, not merely of the right variance (Kolmogorov-Smirnov, pooled)
    assert stats.kstest(standardized.flatten().numpy(), "norm").pvalue > 1e-3


def test_the_same_generator_state_gives_the_same_noise_and_later_calls_differ():
    model = make_model()
    x, y = make_batch(7)
    source = gf.recorded_factors(recorded(model, x, y))

    def call(generator=None):
        return as_list(private_mean(source, 0.5, 1.0, 5.0, generator=generator))

    first = call(torch.Generator().manual_seed(3))
    again = call(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    generator = torch.Generator().manual_seed(3)
    one, two = call(generator), call(generator)
    assert all(torch.equal(a, b) for a, b in zip(one, first))
    assert all(not torch.equal(a, b) for a, b in zip(one, two))
    # without a generator the global one draws: reproducible by torch.manual_seed, fresh per call
    torch.manual_seed(5)
    global_one, global_two = call(), call()
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(global_one, call()))
    assert all(not torch.equal(a, b) for a, b in zip(global_one, global_two))


def test_the_noise_is_drawn_in_the_results_order():
    """The result is the clipped sum plus sigma C randn(generator), tensor by tensor, over B."""
    model = make_model()
    x, y = make_batch(7)
    source = gf.recorded_factors(recorded(model, x, y))
    seeded = torch.Generator().manual_seed(8)
    result = as_list(private_mean(source, 0.5, 1.7, 4.0, generator=seeded))
    generator = torch.Generator().manual_seed(8)
    clipped = reference_clipped_sum(naive_grads(model, x, y), 0.5)
    expected = [
        (s + 1.7 * 0.5 * torch.randn(s.shape, generator=generator, dtype=s.dtype)) / 4.0
        for s in clipped
    ]
    assert_all_close(result, expected)


@pytest.mark.parametrize(
    "pair",
    [
        ("materialized dict", "factored dict"),
        ("materialized list", "factored list"),
        ("materialized tuple", "factored list"),
    ],
)
def test_factored_and_materialized_sources_agree_with_noise(pair):
    model = make_model()
    x, y = make_batch(7)
    made = sources(model, x, y)
    first, second = (
        private_mean(made[kind], 0.5, 1.1, 6.0, generator=torch.Generator().manual_seed(4))
        for kind in pair
    )
    if isinstance(first, dict):
        assert list(first) == list(second)
    assert_all_close(first, second)


# --------------------------------------------------------------------------------------------
# Empty batches: the noise alone
# --------------------------------------------------------------------------------------------


def empty_sources() -> dict[str, object]:
    weight, bias = torch.zeros(0, 3, 2, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)
    layer = gf.LinearFactors(
        torch.zeros(0, 1, 2, dtype=torch.float64), torch.zeros(0, 1, 3, dtype=torch.float64), True
    )
    return {
        "materialized list": [weight, bias],
        "materialized tuple": (weight, bias),
        "materialized dict": {"fc.weight": weight, "fc.bias": bias},
        "LinearFactors": layer,
        "factored list": [layer],
        "factored dict": {"fc": layer},
    }


@pytest.mark.parametrize("kind", list(empty_sources()))
def test_an_empty_batch_gives_the_noise_alone(kind):
    source = empty_sources()[kind]
    result = private_mean(source, 0.8, 1.5, 2.5, generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(6)
    expected = [
        1.5 * 0.8 * torch.randn(shape, generator=generator, dtype=torch.float64) / 2.5
        for shape in [(3, 2), (3,)]
    ]
    assert_all_close(result, expected)
    if isinstance(result, dict):
        assert list(result) == ["fc.weight", "fc.bias"]
    silent = as_list(private_mean(source, 0.8, 0.0, 2.5))
    assert [tuple(t.shape) for t in silent] == [(3, 2), (3,)]
    assert all(t.dtype == torch.float64 and not t.any() for t in silent)


@pytest.mark.parametrize("kind", list(empty_sources()))
def test_an_empty_batch_needs_an_expected_batch_size(kind):
    with pytest.raises(ValueError, match=r"empty \(n = 0\) and expected_batch_size is None"):
        private_mean(empty_sources()[kind], 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def grads():
    model = make_model()
    return naive_grads(model, *make_batch(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise_multiplier": -0.1}, ValueError, r"noise_multiplier must be a finite number"),
        ({"noise_multiplier": math.nan}, ValueError, r"noise_multiplier must be a finite number"),
        ({"noise_multiplier": math.inf}, ValueError, r"noise_multiplier must be a finite number"),
        ({"noise_multiplier": "1.0"}, TypeError, r"noise_multiplier must be a number"),
        ({"noise_multiplier": True}, TypeError, r"noise_multiplier must be a number"),
        ({"max_norm": 0.0}, ValueError, r"max_norm must be a positive finite number"),
        ({"max_norm": -1.0}, ValueError, r"max_norm must be a positive finite number"),
        ({"max_norm": None}, TypeError, r"max_norm must be a positive number"),
        ({"expected_batch_size": 0}, ValueError, r"expected_batch_size must be a positive"),
        ({"expected_batch_size": -3.0}, ValueError, r"expected_batch_size must be a positive"),
        ({"expected_batch_size": math.inf}, ValueError, r"expected_batch_size must be a posit"),
        ({"expected_batch_size": "64"}, TypeError, r"expected_batch_size must be a positive"),
        ({"expected_batch_size": False}, TypeError, r"expected_batch_size must be a positive"),
        ({"generator": 0}, TypeError, r"generator must be a torch.Generator or None"),
        ({"generator": np.random.default_rng(0)}, TypeError, r"generator must be a torch.Gen"),
        ({"group": "world"}, TypeError, r"group must be a torch.distributed process group"),
    ],
)
def test_bad_arguments_are_refused(grads, kwargs, error, match):
    arguments = {"max_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 4.0, **kwargs}
    with pytest.raises(error, match=match):
        private_mean(grads, **arguments)


def test_a_group_without_an_initialized_process_group_is_refused(grads):
    import torch.distributed as dist

    assert not dist.is_initialized()
    group = dist.ProcessGroup.__new__(dist.ProcessGroup)  # a stand-in: it is never used
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialized"):
        private_mean(grads, 1.0, 1.0, 4.0, group=group)


def test_a_generator_on_another_device_is_refused():
    grads = [torch.zeros(3, 2, 2, device="meta"), torch.zeros(3, 2, device="meta")]
    with pytest.raises(ValueError, match=r"generator lives on cpu but the gradients on meta"):
        private_mean(grads, 1.0, 1.0, 4.0, generator=torch.Generator())


def test_a_malformed_source_is_refused_by_the_clipped_mean_checks():
    with pytest.raises(TypeError, match=r"must be the list returned by goodfellow_backprop"):
        private_mean(torch.zeros(3, 2), 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match=r"holds 2 examples but entry"):
        private_mean([torch.zeros(3, 2), torch.zeros(2, 2)], 1.0, 1.0, 4.0)
    with pytest.raises(ValueError, match=r"hold NaN or inf"):
        private_mean([torch.full((3, 2), math.nan)], 1.0, 1.0, 4.0)


# --------------------------------------------------------------------------------------------
# Accounting: Opacus' RDP accountant as tutorial 11 steps it, against the closed forms
# --------------------------------------------------------------------------------------------

ACCOUNTING_CASES = [(1.1, 1 / 24, 360), (0.8, 0.01, 1000), (2.0, 0.2, 50), (4.0, 1.0, 10)]


def epsilon_of_the_tutorials_loop(sigma: float, q: float, steps: int) -> float:
    """What tutorial 11's training loop does: one accountant step per DP-SGD step."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=DELTA)


def epsilon_from_rdp(rdp: np.ndarray, orders: np.ndarray) -> float:
    """RDP to (eps, delta): Balle et al. 2020 (arXiv:1905.09982), Theorem 21, best order."""
    eps = rdp - (math.log(DELTA) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


def sampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP of one sampled Gaussian step at an integer order (Mironov et al. 2019, eq. of A_a).

    A_a = sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)), RDP = log(A_a)/(a - 1);
    summed in log space, as the terms overflow for large orders.
    """
    log_terms = [
        math.lgamma(alpha + 1)
        - math.lgamma(k + 1)
        - math.lgamma(alpha - k + 1)
        + (alpha - k) * math.log1p(-q)
        + k * math.log(q)
        + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]
    top = max(log_terms)
    return (top + math.log(sum(math.exp(t - top) for t in log_terms))) / (alpha - 1)


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize(("sigma", "q", "steps"), ACCOUNTING_CASES)
def test_the_loops_epsilon_is_the_accountants_closed_form(sigma, q, steps):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    closed_form, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    stepped = epsilon_of_the_tutorials_loop(sigma, q, steps)
    assert stepped == pytest.approx(closed_form, rel=1e-12)
    # the conversion written out here, not taken from Opacus
    by_hand = epsilon_from_rdp(np.asarray(rdp), np.asarray(orders))
    assert stepped == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize(("sigma", "q", "steps"), ACCOUNTING_CASES)
def test_the_accountants_rdp_is_the_sampled_gaussian_mechanisms(sigma, q, steps):
    from opacus.accountants.analysis import rdp as analysis

    orders = [2, 3, 5, 8, 16, 32]
    rdp = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    if q == 1.0:
        expected = [steps * alpha / (2 * sigma**2) for alpha in orders]  # plain Gaussian
    else:
        expected = [steps * sampled_gaussian_rdp(q, sigma, alpha) for alpha in orders]
    np.testing.assert_allclose(rdp, expected, rtol=1e-9)


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_get_noise_multiplier_reaches_its_target():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=1 / 24, steps=360, accountant="rdp"
    )
    epsilon = epsilon_of_the_tutorials_loop(sigma, 1 / 24, 360)
    assert 2.0 - 0.01 <= epsilon <= 2.0  # the search's tolerance, from below
    assert epsilon_of_the_tutorials_loop(sigma * 0.97, 1 / 24, 360) > 2.0


# --------------------------------------------------------------------------------------------
# Two processes: the same update on every rank, the noise added once
# --------------------------------------------------------------------------------------------

WORLD_SIZE = 2
SHARES = {0: slice(0, 4), 1: slice(4, 7)}  # unequal shares of a batch of 7
DISTRIBUTED_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_cases(rank: int | None):
    """Name -> (source of this rank's share, or of the whole batch if rank is None, kwargs)."""
    model = make_model()
    x, y = make_batch(7)
    share = slice(None) if rank is None else SHARES[rank]
    everything = slice(None) if rank in (None, 0) else slice(0, 0)  # rank 1 holds nothing
    factors = gf.recorded_factors(recorded(model, x[share], y[share]))
    grads = naive_grads(model, x, y)
    return {
        "no noise, factored, B = n": (factors, {"noise_multiplier": 0.0}),
        "no noise, materialized, B given": (
            [g[share] for g in grads],
            {"noise_multiplier": 0.0, "expected_batch_size": 5.5},
        ),
        "noise, generator": (
            factors,
            {"noise_multiplier": 1.3, "expected_batch_size": 5.5, "seed": 11},
        ),
        "noise, generator, B = n": (factors, {"noise_multiplier": 0.9, "seed": 12}),
        "noise, one rank empty": (
            [g[everything] for g in grads],
            {"noise_multiplier": 1.3, "seed": 13},
        ),
        "noise, global generator": (factors, {"noise_multiplier": 0.7, "expected_batch_size": 9}),
    }


def call(source, kwargs, group=None):
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return as_list(private_mean(source, 0.5, generator=generator, group=group, **kwargs))


def _distributed_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name, (source, kwargs) in distributed_cases(rank).items():
            torch.manual_seed(100 + rank)  # the global generators differ between the ranks
            results[name] = call(source, kwargs, group=dist.group.WORLD)
        torch.save(results, out)
        dist.barrier()  # both ranks done before the group goes (gloo can abort at exit)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_one_process_result_on_every_rank(tmp_path):
    port = _free_port()
    root = Path(__file__).parent.parent
    paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_privacy", str(rank), str(port), str(out)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outs)
    ]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=DISTRIBUTED_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"a rank hung for {DISTRIBUTED_TIMEOUT_S} s: {[p.poll() for p in processes]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{log}"
    per_rank = [torch.load(out) for out in outs]
    single = {}
    for name, (source, kwargs) in distributed_cases(None).items():
        torch.manual_seed(100)  # rank 0's global generator
        single[name] = call(source, kwargs)
    for name, expected in single.items():
        first, second = per_rank[0][name], per_rank[1][name]
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"{name}: ranks differ"
        assert_all_close(first, expected)  # noise once: exactly the single process's update


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


# --------------------------------------------------------------------------------------------
# The DP-SGD benchmark: every contender's step is checked against the naive loop
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_dpsgd_benchmarks_methods_make_the_naive_loops_step(kind):
    from benchmarks import dpsgd

    if kind == "mlp":
        widths = (5, 4, 10)
        config = dpsgd.Config("tiny-mlp", 6, (5,), lambda: dpsgd._mlp(widths), widths)
    else:
        config = dpsgd.Config(
            "tiny-cnn",
            6,
            (1, 4, 4),
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(8, 10),
            ),
        )
    problem = dpsgd.Problem(config, torch.device("cpu"))
    checked = []
    for name, method in dpsgd.METHODS.items():
        try:
            instance = method(problem, 0.0)
        except dpsgd.SkipMethodError:
            continue
        assert dpsgd.check(instance) <= 1e-4 + instance.approximation  # raises if it deviates
        checked.append(name)
    assert {"goodfellow_hooks", "opacus_hooks", "opacus_ghost"} <= set(checked)
    records = [
        {"config": config.label, "method": m, "median_s": 1.0 + k} for k, m in enumerate(checked)
    ]
    (row,) = dpsgd.targets(records)
    assert row["speedup"] == pytest.approx(
        min(r["median_s"] for r in records if r["method"].startswith("opacus"))
        / min(r["median_s"] for r in records if r["method"].startswith("goodfellow"))
    )
