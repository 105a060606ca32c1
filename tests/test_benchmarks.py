"""Smoke tests of the benchmark: every method computes the right numbers, records have their fields.

No timing is asserted; the configurations are tiny and in float64, where every method must agree
with an independent reference (``torch.func``) to ``TOLERANCES[torch.float64]``.
"""

import copy
import csv
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import benchmarks
import goodfellow as gf
from benchmarks import memory, report
from benchmarks import methods as bm
from benchmarks.run import (
    MAX_PRIMING_STEPS,
    PRIMING_SECONDS,
    PRIMING_STEPS,
    allocated_peak_bytes,
    benchmark_config,
    parse_args,
    peak_extra_mb,
    priming_steps,
)
from tests.conftest import TOLERANCES

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    # torch.func's per-example loop over nn.MultiheadAttention's CPU flash attention (the
    # reference is slower, not different).
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
]

REPO = Path(__file__).resolve().parent.parent
TINY = bm.Config("tiny", (5, 4, 3), 6)
DEEP_TINY = bm.Config("deep-tiny", (3, 4, 4, 4, 2), 5)
# Tiny versions of the conv configurations: zero padding and stride (which the peers get right),
# and reflect padding with a grouped conv (which they do not).
CNN_TINY = bm.Config("cnn-tiny", (2, 4, 3, 3), 5, "tiny-cnn-zeros")
CNN_REFLECT_TINY = bm.Config("cnn-reflect-tiny", (2, 4, 4, 3), 4, "tiny-cnn")
# Tiny versions of the language models: vocabulary 11, width 8, 2 heads, 2 blocks, T = 5.
LM_TINY = bm.Config("lm-tiny", (11, 8, 2, 2), 3, "tiny-lm", 5)
LM_MHA_TINY = bm.Config("lm-mha-tiny", (11, 8, 2, 2), 3, "tiny-lm-mha", 5)
RECORD_FIELDS = {
    "config": str,
    "method": str,
    "median_s": float,
    "min_s": float,
    "max_s": float,
    "runs": int,
    "n": int,
    "widths": list,
    "device": str,
    "torch": str,
    "allocator": str,
}


def test_benchmarks_package_is_this_repositorys():
    # Opacus' wheel installs a top-level package named `benchmarks` too; ours must win.
    assert Path(benchmarks.__file__).resolve().parent == REPO / "benchmarks"


@pytest.fixture(
    scope="module", params=[TINY, DEEP_TINY, CNN_TINY, LM_TINY, LM_MHA_TINY], ids=lambda c: c.name
)
def problem(request):
    return bm.Problem(request.param, dtype=torch.float64, seed=3)


def independent_reference(problem: bm.Problem) -> list[torch.Tensor]:
    """Per-example gradients by torch.func, not by the naive loop the benchmark checks against."""
    return gf.torch_func_per_example_grads(
        problem.sequential(), problem.loss_fn, problem.inputs, problem.targets
    )


def expected_result(problem: bm.Problem, produces: str):
    per_example = independent_reference(problem)
    n = problem.config.n
    flat = torch.cat([g.reshape(n, -1) for g in per_example], dim=1)  # (n, P)
    norms = torch.linalg.vector_norm(flat, dim=1)  # (n,)
    factors = torch.minimum(torch.ones_like(norms), problem.max_norm / norms)  # (n,)
    return {
        "per_example": per_example,
        "batch": [g.sum(0) for g in per_example],
        "norms": [norms],
        "clipped_mean": [torch.einsum("n,n...->...", factors, g) / n for g in per_example],
    }[produces]


@pytest.mark.parametrize("name", list(bm.METHODS))
def test_method_agrees_with_torch_func(problem, name):
    if name not in bm.methods_for(problem.config):
        cls = bm.METHODS[name]
        assert not problem.config.is_mlp
        assert cls.mlp_only or problem.config.family not in cls.families
        if cls.mlp_only:
            with pytest.raises(ValueError, match="is not an MLP"):
                cls(problem)
        return
    method = bm.METHODS[name](problem)
    method.reset()
    method.step()
    if method.produces == "write":
        buffer = method.result()
        assert buffer.numel() == problem.config.n * problem.config.num_params
        assert torch.all(buffer == bm.WRITE_VALUE)
        return
    actual = method.result()
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = expected_result(problem, method.produces)
    assert len(actual) == len(expected)
    tolerance = dict(TOLERANCES[torch.float64])
    # Opacus clips with C / (norm + 1e-6): a deliberate deviation the check allows for.
    tolerance["atol"] += method.approximation * max(float(e.abs().max()) for e in expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerance)
    assert bm.check(method) <= 1e-10 + method.approximation


@pytest.mark.parametrize("name", ["goodfellow_backprop", "norms_only", "clipped_mean", "opacus"])
def test_check_catches_a_wrong_result(problem, name):
    if name not in bm.methods_for(problem.config):
        return  # the MLP-only route; the others are checked on this configuration
    method = bm.METHODS[name](problem)
    method.step()
    result = method.result()
    first = result if isinstance(result, torch.Tensor) else result[0]
    first.view(-1)[0] += 1.0
    with pytest.raises(AssertionError, match="deviates from the naive loop"):
        bm.check(method)


def test_pooling_routes_differ_where_float32_rounding_makes_a_tie():
    # Two channels summed by a 1x1 convolution: at the second position float32 loses the
    # 2**-25 (1 + 2**-25 rounds to 1), so the pooling window sees a tie and keeps the first
    # entry, while float64 sees the second entry larger. Both forwards are right; the
    # gradient goes to another position.
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(conv, nn.MaxPool2d((1, 2)))
    inputs = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0**-25]]]])  # (1, 2, 1, 2)
    problem = SimpleNamespace(sequential=lambda: copy.deepcopy(model), inputs=inputs)
    assert bm.pooling_routes_differ(problem, 0)
    problem.inputs = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0**-20]]]])  # no tie in float32
    assert not bm.pooling_routes_differ(problem, 0)


def test_naive_loop_check_forgives_only_examples_whose_pooling_took_another_route(monkeypatch):
    problem = bm.Problem(CNN_REFLECT_TINY, seed=5)  # float32, with a max pooling
    method = bm.METHODS["naive_loop"](problem)
    method.step()
    method.result()[0][1].view(-1)[0] += 1.0  # example 1 far off
    with pytest.raises(AssertionError, match="deviates from the naive loop"):
        bm.check(method)  # its pooling routes are the batched ones: no excuse
    monkeypatch.setattr(bm, "pooling_routes_differ", lambda p, example: example == 1)
    assert bm.check(method) <= 1e-4  # example 1 left out, the others within float32's error
    monkeypatch.setattr(bm, "pooling_routes_differ", lambda p, example: example == 2)
    with pytest.raises(AssertionError, match="deviates from the naive loop"):
        bm.check(method)


@pytest.fixture(scope="module")
def reflect_problem():
    return bm.Problem(CNN_REFLECT_TINY, dtype=torch.float64, seed=5)


@pytest.mark.parametrize("name", ["hooks", "norms_only", "clipped_mean", "torch_func_vmap"])
def test_goodfellow_is_right_on_reflect_padding_and_groups(reflect_problem, name):
    method = bm.METHODS[name](reflect_problem)
    method.step()
    actual = method.result()
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = expected_result(reflect_problem, method.produces)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **TOLERANCES[torch.float64])
    assert bm.check(method) <= 1e-10


@pytest.mark.parametrize("name", ["opacus", "backpack"])
def test_check_stops_a_peer_that_treats_reflect_padding_as_zeros(reflect_problem, name):
    # The benchmark's conv configurations use zero padding, where the peers are right; this
    # makes sure a wrong peer would stop the run rather than be timed.
    method = bm.METHODS[name](reflect_problem)
    method.step()
    with pytest.raises(AssertionError, match="deviates from the naive loop"):
        bm.check(method)


def test_conv_configurations_are_the_issues_networks():
    by_label = {c.label: c for c in bm.CONV_CONFIGS}
    assert set(by_label) == {"cnn-mnist/n128", "3c3d/n64"}
    # P counted by hand: conv weights and biases, then the linear layers.
    assert by_label["cnn-mnist/n128"].num_params == (16 * 25 + 16) + (32 * 16 * 25 + 32) + (
        1568 * 10 + 10
    )
    assert by_label["3c3d/n64"].num_params == (
        (64 * 3 * 25 + 64) + (96 * 64 * 9 + 96) + (128 * 96 * 9 + 128)
        + (1152 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10)
    )
    for config in bm.CONV_CONFIGS:
        x = torch.zeros(2, *config.input_shape)
        assert config.sequential()(x).shape == (2, 10)
        assert "goodfellow_backprop" not in bm.methods_for(config)
        assert {"hooks", "norms_only", "clipped_mean", "ghost_clipped_mean"} <= set(
            bm.methods_for(config)
        )


def lm_params(d: int, vocab: int, t: int, blocks: int, mha: bool) -> int:
    """P of the language model counted by hand (the key projection of ours has no bias)."""
    attention = 4 * d * d + (4 if mha else 3) * d
    block = 2 * 2 * d + attention + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + t * d + blocks * block + 2 * d + (d * vocab + vocab)


def test_lm_configurations_are_the_issues_networks():
    by_label = {c.label: c for c in bm.LM_CONFIGS}
    assert set(by_label) == {"tiny-lm/T64-n32", "tiny-lm/T256-n8", "tiny-lm-mha/T64-n32"}
    for label, config in by_label.items():
        mha = label.startswith("tiny-lm-mha")
        assert config.widths == (96, 128, 4, 2)
        assert config.num_params == lm_params(128, 96, config.seq_len, 2, mha)
        model = config.sequential()
        assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 2 * mha
        assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5
        tokens = torch.randint(96, (2, config.seq_len))
        assert model(tokens).shape == (2, config.seq_len, 96)
        expected = {"plain_backward", "write_floor", "naive_loop", "torch_func_vmap", "hooks",
                    "norms_only", "clipped_mean", "ghost_clipped_mean"}  # fmt: skip
        expected |= set() if mha else {"opacus", "opacus_ghost_clipping"}
        assert set(bm.methods_for(config)) == expected


def test_lm_attention_is_causal():
    # Changing the last token must leave the logits of every earlier position unchanged.
    for config in (LM_TINY, LM_MHA_TINY):
        model = config.sequential().double()
        tokens = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(0))
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 11
        a, b = model(tokens), model(changed)
        torch.testing.assert_close(a[:, :-1], b[:, :-1], **TOLERANCES[torch.float64])
        assert not torch.allclose(a[:, -1], b[:, -1])


def test_token_cross_entropy_sums_tokens_per_example():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)  # (n, T, vocab)
    targets = torch.randint(6, (3, 4), generator=generator)  # (n, T)
    per_example = bm.TokenCrossEntropy("none")(logits, targets)
    loop = torch.stack([
        sum(nn.functional.cross_entropy(logits[i, t], targets[i, t]) for t in range(4))
        for i in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(per_example, loop, **TOLERANCES[torch.float64])
    torch.testing.assert_close(
        bm.TokenCrossEntropy("sum")(logits, targets), loop.sum(), **TOLERANCES[torch.float64]
    )
    with pytest.raises(ValueError, match="reduction 'mean'; use 'sum' or 'none'"):
        bm.TokenCrossEntropy("mean")(logits, targets)


def test_reset_drops_results_and_steps_give_fresh_ones(problem):
    method = bm.METHODS["plain_backward"](problem)
    method.step()
    first = [g.clone() for g in method.result()]
    method.reset()
    assert all(g is None for g in method.result())
    method.step()
    for a, b in zip(method.result(), first):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@settings(max_examples=8)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    classes=st.integers(2, 5),
    n=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_fast_methods_pass_the_check_on_any_small_mlp(widths, classes, n, seed):
    config = bm.Config("random", (*widths, classes), n)
    problem = bm.Problem(config, dtype=torch.float64, seed=seed)
    for name in ("goodfellow_backprop", "hooks", "norms_only", "clipped_mean", "write_floor"):
        method = bm.METHODS[name](problem)
        method.step()
        assert bm.check(method) <= 1e-10


def test_records_have_the_schema_and_report_is_written(tmp_path):
    names = ["plain_backward", "write_floor", "goodfellow_backprop", "norms_only", "backpack"]
    records = benchmark_config(TINY, torch.device("cpu"), 2, 1, names, "default")
    assert [r["method"] for r in records] == names
    for record in records:
        for field, kind in RECORD_FIELDS.items():
            assert isinstance(record[field], kind), field
        assert record["config"] == "tiny/n6" and record["n"] == 6 and record["widths"] == [5, 4, 3]
        assert record["runs"] == 2 == len(record["times_s"])
        assert record["min_s"] <= record["median_s"] <= record["max_s"]
        assert record["device"] == "cpu" and record["torch"] == torch.__version__
        assert record["check_deviation"] <= 1e-4
        assert record["minor_faults_per_step"] >= 0
        assert PRIMING_STEPS <= record["priming_steps"] <= MAX_PRIMING_STEPS
        if "peak_mem_mb" in record:
            assert record["peak_mem_mb"] >= 0
    plain = records[0]
    assert plain["ratio_to_plain_backward"] == 1.0

    results = {"meta": {"device": "cpu", "device_name": "test"}, "records": records}
    json.dumps(results)  # serializable as written by run.py
    written = report.write_all(results, tmp_path)
    assert {p.name for p in written} == {"cpu_results.csv", "cpu_targets.csv", "cpu_default.png"}
    table = (tmp_path / "cpu_results.csv").read_text().splitlines()
    assert table[0].startswith("Configuration,Method,default: median ms")
    assert len(table) == 1 + len(names)
    targets = report.evaluate_targets(results)
    assert {row["method"] for row in targets} >= {"goodfellow_backprop", "norms_only"}
    assert all(0 <= row["met"] <= row["checked"] for row in targets)


@pytest.mark.parametrize("check_every", [10, 7, 4])
@given(seconds=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_priming_covers_its_time_and_keeps_the_check_off_the_beat(seconds, check_every):
    k = priming_steps(seconds, check_every)
    assert PRIMING_STEPS <= k <= MAX_PRIMING_STEPS
    # k + 1 steps per round: the timed steps meet every residue mod check_every, so one in
    # check_every of them carries the accounting check
    assert {(k + 1) * r % check_every for r in range(check_every)} == set(range(check_every))
    assert k * seconds >= PRIMING_SECONDS or k > MAX_PRIMING_STEPS - check_every
    # and no more than needed: one valid count fewer would fall short of the time
    fewer = [j for j in range(PRIMING_STEPS, k) if math.gcd(j + 1, check_every) == 1]
    assert not fewer or fewer[-1] * seconds < PRIMING_SECONDS


def test_priming_of_the_two_benchmark_cases():
    assert priming_steps(0.040) == 2  # a language model: the two of earlier runs
    assert priming_steps(0.0028) == 18  # 50 ms of hooks on deep-mlp/n256; 19 steps a round


def test_workspace_counts_in_peak_memory():
    problem = bm.Problem(TINY)
    method = bm.METHODS["goodfellow_backprop"](problem)
    assert method.workspace_bytes == TINY.n * TINY.num_params * 4
    peak = peak_extra_mb(method)
    assert peak >= method.workspace_bytes / 2**20


def test_allocated_peak_counts_what_a_step_holds_at_once():
    def step():
        first = torch.ones(2**20)  # 4 MiB
        second = torch.ones(2**19)  # 2 MiB while the first is held
        del first
        third = torch.ones(2**19)  # 2 MiB into what the first left
        return second, third

    assert allocated_peak_bytes(step) == 6 * 2**20


def test_allocated_peak_counts_the_backward():
    layer = nn.Linear(1024, 1024, bias=False)
    inputs = torch.ones(1, 1024)
    # the weight's gradient, 4 MiB, is allocated inside the autograd engine
    assert allocated_peak_bytes(lambda: layer(inputs).sum().backward()) >= 4 * 2**20


def test_memory_sweep_reads_each_width(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--quick", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    shapes = [(r["T"], r["n"], r["d"]) for r in records]
    want = [(t, n, d) for t, n in memory.QUICK_SHAPES for d in memory.QUICK_WIDTHS]
    assert shapes == want
    for r in records:
        plain = r["plain_backward_peak_mb"]
        # the clipped mean holds what was recorded, and the norms (taken during the backward,
        # each layer's records dropped there) much less
        assert 0 < r["clipped_mean_peak_mb"] - plain
        assert r["norms_only_peak_mb"] - plain < 0.5 * r["recorded_mb"]


def test_targets_are_judged_from_the_numbers():
    def record(method, median, allocator="default", config="mnist-mlp/n512"):
        return {
            "config": config, "method": method, "median_s": median, "allocator": allocator,
            "per_example_mb": 100.0, "peak_mem_mb": 1.0,
        }

    records = [
        record("plain_backward", 1.0), record("write_floor", 1.0),
        record("goodfellow_backprop", 2.5), record("backpack", 4.0), record("opacus", 9.0),
        record("norms_only", 1.1), record("clipped_mean", 1.5),
        record("opacus_ghost_clipping", 1.4),
    ]
    rows = {(r["target"], r["method"]): r for r in report.evaluate_targets({"records": records})}

    def row(start, method):
        (match,) = [r for (t, m), r in rows.items() if t.startswith(start) and m == method]
        return match

    assert row("materialized", "goodfellow_backprop")["met"] == 1  # 2.5 / (1 + 1) = 1.25
    assert row("2x faster", "goodfellow_backprop")["worst"] == "1.60x"  # 4.0 / 2.5
    assert row("2x faster", "goodfellow_backprop")["met"] == 0
    assert row("faster than every peer", "goodfellow_backprop")["met"] == 1
    assert row("norms_only at most", "norms_only")["met"] == 0  # 1.1
    assert row("clipped_mean at most", "clipped_mean")["met"] == 1  # 1.5
    assert row("clipped_mean faster", "clipped_mean")["met"] == 0  # 1.5 vs 1.4
    assert row("peak extra memory", "norms_only")["met"] == 1  # 1 MB of 100 MB


def test_conv_targets_are_judged_from_the_numbers():
    def record(method, median, config="3c3d/n64"):
        return {"config": config, "method": method, "median_s": median, "allocator": "default"}

    records = [
        record("plain_backward", 1.0), record("write_floor", 0.25),
        record("hooks", 1.9), record("torch_func_vmap", 2.6), record("opacus", 3.0),
        record("norms_only", 1.3), record("clipped_mean", 1.45),
        record("opacus_ghost_clipping", 1.4),
    ]
    rows = {r["target"]: r for r in report.evaluate_targets({"records": records})}
    assert all(t.startswith("conv: ") for t in rows)  # the MLP targets do not apply
    assert rows["conv: hooks within 1.6x of plain_backward + write_floor"]["met"] == 1  # 1.52
    assert rows["conv: hooks 1.3x faster than the fastest peer"]["met"] == 1  # 2.6 / 1.9
    assert rows["conv: norms_only at most 1.2x plain_backward"]["met"] == 0  # 1.3
    assert rows["conv: clipped_mean at most 1.5x plain_backward"]["met"] == 1  # 1.45
    assert rows["conv: clipped_mean faster than Opacus ghost clipping"]["met"] == 0  # 1.45 > 1.4


def test_lm_targets_are_judged_from_the_numbers():
    def record(method, median, config="tiny-lm/T64-n32"):
        return {
            "config": config, "method": method, "median_s": median, "allocator": "default",
            "per_example_mb": 50.0, "peak_mem_mb": 80.0 if method == "plain_backward" else 82.0,
        }

    records = [
        record("plain_backward", 1.0), record("write_floor", 0.5),
        record("hooks", 1.75), record("torch_func_vmap", 1.7), record("opacus", 3.0),
        record("norms_only", 1.05), record("clipped_mean", 1.35),
        record("opacus_ghost_clipping", 2.0),
    ]
    rows = {(r["target"], r["method"]): r for r in report.evaluate_targets({"records": records})}
    assert all(t.startswith("lm: ") for t, _ in rows)  # neither MLP nor conv targets apply
    assert rows[("lm: hooks within 1.2x of plain_backward + write_floor", "hooks")]["met"] == 1
    assert rows[("lm: hooks faster than every peer", "hooks")]["met"] == 0  # 1.7 < 1.75
    assert rows[("lm: norms_only at most 1.1x plain_backward", "norms_only")]["met"] == 1
    assert rows[("lm: clipped_mean at most 1.3x plain_backward", "clipped_mean")]["met"] == 0
    ghost = rows[("lm: clipped_mean faster than Opacus ghost clipping", "clipped_mean")]
    assert ghost["met"] == 1 and ghost["worst"] == "1.48x"  # 2.0 / 1.35
    memory = "lm: peak memory above plain_backward's O(n), not O(nP): below 10% of n*P"
    norms_memory = rows[(memory, "norms_only")]
    assert norms_memory["met"] == 1 and norms_memory["worst"] == "4.0%"  # 82 - 80 MB of 50 MB


def _timed(method, times, config="cnn-mnist/n128", allocator="default"):
    """A record with its timed steps, as ``benchmark_config`` writes it."""
    return {
        "config": config, "method": method, "allocator": allocator, "times_s": list(times),
        "median_s": statistics.median(times),
    }


def _row(rows, target):
    (match,) = [r for r in rows if r["target"] == target]
    return match


NORMS_LINE = "conv: norms_only at most 1.2x plain_backward"


def test_interval_resamples_whole_rounds():
    # The machine's load swings 3x from round to round, and norms_only takes 1.5 plain steps
    # in each: resampling rounds together leaves the ratio exactly 1.5, a miss the spread of
    # the run cannot turn. Resampling each method's steps on its own would not.
    plain = [1.0, 3.0, 2.0, 1.2, 2.6, 1.8, 2.9, 1.1, 2.2, 1.4, 2.4, 1.6, 2.8, 1.3, 2.1]
    records = [_timed("plain_backward", plain), _timed("norms_only", [1.5 * t for t in plain])]
    row = _row(report.evaluate_targets({"records": records}), NORMS_LINE)
    assert row["met"] == 0 and row["worst"] == "1.50x"
    assert row["interval"] == "1.50x-1.50x" and row["decided"] is True


def test_verdict_inside_the_runs_spread_is_not_decided():
    # Eight of fifteen rounds at 1.0 plain steps and seven at 1.5: the median passes the line,
    # but a resampling of the rounds with more slow ones than fast ones fails it.
    plain = [1.0] * 15
    norms = [1.0, 1.5] * 7 + [1.0]
    records = [_timed("plain_backward", plain), _timed("norms_only", norms)]
    row = _row(report.evaluate_targets({"records": records}), NORMS_LINE)
    assert row["met"] == 1 and row["worst"] == "1.00x"
    assert row["interval"] == "1.00x-1.50x" and row["decided"] is False
    assert "MET ?" in report.targets_text({"records": records})


def test_a_miss_is_decided_by_its_surest_configuration():
    # cnn-mnist fails over its whole interval; 3c3d passes at its median but not over its
    # interval: the miss stands either way.
    plain = [1.0] * 15
    records = [
        _timed("plain_backward", plain), _timed("norms_only", [1.4] * 15),
        _timed("plain_backward", plain, "3c3d/n64"),
        _timed("norms_only", [1.0, 1.5] * 7 + [1.0], "3c3d/n64"),
    ]
    row = _row(report.evaluate_targets({"records": records}), NORMS_LINE)
    assert row["met"] == 1 and row["checked"] == 2 and row["worst_config"] == "cnn-mnist/n128"
    assert row["decided"] is True


def test_no_interval_without_timed_steps_or_for_memory():
    record = {"config": "tiny-lm/T64-n32", "allocator": "default", "per_example_mb": 50.0}
    records = [
        {**record, "method": "plain_backward", "median_s": 1.0, "peak_mem_mb": 80.0},
        {**record, "method": "norms_only", "median_s": 1.05, "peak_mem_mb": 81.0},
    ]
    rows = report.evaluate_targets({"records": records})
    assert rows and all(r["interval"] is None and r["decided"] is None for r in rows)
    records = [{**r, "times_s": [r["median_s"]] * 5} for r in records]
    rows = {r["target"]: r for r in report.evaluate_targets({"records": records})}
    assert rows["lm: norms_only at most 1.1x plain_backward"]["interval"] == "1.05x-1.05x"
    memory_line = "lm: peak memory above plain_backward's O(n), not O(nP): below 10% of n*P"
    assert rows[memory_line]["interval"] is None and rows[memory_line]["decided"] is None


def test_round_medians_draw_the_same_rounds_for_every_method():
    times = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.6]
    records = [_timed("plain_backward", times), _timed("hooks", times)]
    resampled = report.round_medians(records)
    plain = resampled[("default", "cnn-mnist/n128", "plain_backward")]
    assert plain == resampled[("default", "cnn-mnist/n128", "hooks")]
    assert len(plain) == report.RESAMPLES and set(plain) <= set(times)
    assert len(set(plain)) > 1  # the draws differ
    assert report.round_medians(records) == resampled  # seeded


def test_targets_table_has_the_interval_columns(tmp_path):
    plain = [1.0] * 15
    records = [_timed("plain_backward", plain), _timed("norms_only", [1.4] * 15)]
    path = report.write_targets_csv({"records": records}, tmp_path / "targets.csv")
    header, *rows = list(csv.reader(path.open()))
    assert header[5:7] == ["90% interval over resampled rounds", "Verdict outside the run's spread"]
    (norms,) = [r for r in rows if r[0] == NORMS_LINE]
    assert norms[3] == "no (0/1)" and norms[5] == "1.40x-1.40x" and norms[6] == "yes"


def test_quick_run_never_overwrites_the_committed_results():
    quick = parse_args(["--quick"])
    assert "_scratch" in quick.out.parts and "_scratch" in quick.figures_dir.parts
    assert quick.runs >= 7 and [c for c in quick.configs] == [c.label for c in bm.QUICK_CONFIGS]
    full = parse_args([])
    assert full.out == REPO / "benchmarks" / "results.json"
    assert full.runs >= 7 and full.allocators == ["default", "thp"]
    assert parse_args(["--device", "cuda"]).allocators == ["default"]
    conv = parse_args(["--quick", "--conv"])
    assert conv.configs == [c.label for c in (*bm.QUICK_CONFIGS, *bm.CONV_CONFIGS)]
    lm = parse_args(["--quick", "--lm"])
    assert lm.configs == [c.label for c in (*bm.QUICK_CONFIGS, *bm.LM_CONFIGS)]
    assert set(bm.LM_CONFIGS) <= set(bm.CONFIGS)  # in the full run too


def test_unknown_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown configuration 'mnist/n7'"):
        parse_args(["--configs", "mnist/n7"])


def test_cuda_without_a_gpu_is_refused_clearly(monkeypatch):
    from benchmarks.run import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch.cuda.is_available\\(\\) is False"):
        main(["--device", "cuda", "--quick"])


def test_gpu_section_says_there_is_none_without_results():
    text = report.gpu_section(None)
    assert "No GPU" in text and ".. figure::" not in text


def test_gpu_section_shows_the_device_its_figure_and_tables():
    records = [
        {"allocator": "default", "config": "tiny/n6", "method": "plain_backward"},
    ]
    results = {
        "meta": {
            "device": "cuda",
            "device_name": "NVIDIA Test GPU",
            "date": "2026-11-23",
            "versions": {"torch": "2.13.0", "opacus": "1.6.0", "backpack-for-pytorch": "1.7.1"},
        },
        "records": records,
    }
    text = report.gpu_section(results)
    assert "**NVIDIA Test GPU**" in text and "Opacus 1.6.0, BackPACK 1.7.1" in text
    assert ".. figure:: _static/benchmarks/cuda_default.png" in text
    assert ":file: _static/benchmarks/cuda_targets.csv" in text
    assert ":file: _static/benchmarks/cuda_results.csv" in text
    assert "No GPU" not in text
