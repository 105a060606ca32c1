"""Smoke test of the DDP benchmark: two gloo ranks run every method, the records hold their fields.

No timing is asserted. The bytes per step are compared with the communication each method does,
written out here from the model's widths: DDP's gradient all-reduce is P float32 numbers, the
library's all-reduces are the sums the statistics need (see ``benchmarks/ddp.py``).
"""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ddp
from benchmarks.run import MAX_PRIMING_STEPS, PRIMING_STEPS

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (64, 16, 10)
BATCH = 8
TIMEOUT_S = 240
LAUNCHES = 2  # the ratios are medians over launches: run that path too


def _layers() -> list[tuple[int, int]]:
    return list(zip(WIDTHS[:-1], WIDTHS[1:]))


P = sum(d_out * d_in + d_out for d_in, d_out in _layers())  # weights and biases: 1210
F32 = 4
EXPECTED_BYTES = {
    "ddp_plain": F32 * P,
    # under no_sync: no gradient all-reduce; the clipped sums and the example count instead
    "ddp_clipped_mean": F32 * (P + 1),
    # DDP's gradient, then the sums with the count, then the squared sums
    "ddp_variance": F32 * P + F32 * (P + 1) + F32 * P,
    # the hook all-reduces DDP's gradient itself, two scalars appended to its last bucket
    "ddp_noise_scale_hook": F32 * P + 2 * F32,
    "ddp_torch_allreduce_hook": F32 * P,
    # DDP's gradient; per layer A (bias column included) and G with their two counts, then the
    # EKFAC scalings with one count
    "ddp_ekfac": F32 * P
    + F32 * sum((i + 1) ** 2 + o**2 + 2 + o * (i + 1) + 1 for i, o in _layers()),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "results_ddp.json"
    command = [
        sys.executable, "-m", "benchmarks.ddp", "--quick", "--runs", "2", "--warmup", "1",
        "--launches", str(LAUNCHES), "--instances", "2", "--batch", str(BATCH),
        "--widths", *map(str, WIDTHS),
        "--out", str(out), "--timeout", str(TIMEOUT_S - 30),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"python -m benchmarks.ddp --quick ran for more than {TIMEOUT_S} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets:" in done.stdout
    return json.loads(out.read_text())


def test_every_method_has_a_record_with_positive_times(results):
    records = {r["method"]: r for r in results["records"]}
    assert set(records) == set(EXPECTED_BYTES) == set(ddp.METHODS)
    for name, record in records.items():
        assert record["runs"] == 2 and record["launches"] == LAUNCHES, name
        assert len(record["times_s"]) == 2 * LAUNCHES == 2 * len(record["launch_ratios"]), name
        assert all(t > 0 for t in record["times_s"]), name
        assert record["min_s"] <= record["median_s"] <= record["max_s"], name
        assert record["num_params"] == P
        # checked against one process on the global batch, and the ranks stayed in step
        assert record["check_deviation"] <= 1e-4, name
        assert record["ranks_max_param_difference"] == 0.0, name
        # one count per launch, agreed by the ranks (they would deadlock otherwise)
        assert len(record["priming_steps"]) == LAUNCHES, name
        assert all(PRIMING_STEPS <= k <= MAX_PRIMING_STEPS for k in record["priming_steps"])
    assert records["ddp_plain"]["ratio_to_ddp_plain"] == 1.0


@pytest.mark.parametrize("method", list(EXPECTED_BYTES))
def test_the_bytes_per_step_follow_the_formula(results, method):
    record = next(r for r in results["records"] if r["method"] == method)
    assert record["bytes_per_step"] == EXPECTED_BYTES[method]
    assert record["bytes_expected"] == EXPECTED_BYTES[method]
    assert record["bytes_per_step"] == (
        record["bytes_ddp_builtin"] + sum(size for _, size in record["python_collectives"])
    )


def test_the_targets_are_judged(results):
    targets = {t["method"]: t for t in results["targets"]}
    assert set(targets) == {"ddp_noise_scale_hook", "ddp_clipped_mean"}
    by_method = {r["method"]: r for r in results["records"]}
    for name, target in targets.items():
        assert target["ratio"] == by_method[name]["ratio_to_ddp_plain"]
        assert target["met"] == (target["ratio"] <= target["target"])
    for name, record in by_method.items():  # a ratio per launch, the median over launches
        assert record["ratio_to_ddp_plain"] == statistics.median(record["launch_ratios"]), name
    assert by_method["ddp_plain"]["launch_ratios"] == [1.0] * LAUNCHES
    hook, bare = (by_method[m]["launch_ratios"] for m in ("ddp_noise_scale_hook",
                                                          "ddp_torch_allreduce_hook"))  # fmt: skip
    diagnostics = results["diagnostics"]
    assert diagnostics["ddp_noise_scale_hook / ddp_torch_allreduce_hook"] == statistics.median(
        h / b for h, b in zip(hook, bare)
    )
    assert diagnostics["ddp_torch_allreduce_hook / ddp_plain"] == statistics.median(bare)
    assert results["meta"]["launches"] == LAUNCHES
    assert results["meta"]["instances"] == 2
    assert results["meta"]["world_size"] == 2
    assert len(results["meta"]["load_average"]) == 2


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--widths", "10", "5"], r"--widths must start with 64"),
        (["--widths", "64"], r"--widths must start with 64"),
        (["--widths", "64", "0", "10"], r"positive layer widths"),
        (["--batch", "0"], r"--batch \(examples per rank\) must be in \[1, 898\]"),
        (["--batch", "899"], r"must be in \[1, 898\]"),
        (["--runs", "0"], r"--runs must be >= 1"),
        (["--launches", "0"], r"--launches must be >= 1"),
        (["--instances", "0"], r"--instances must be >= 1"),
        (["--timeout", "0"], r"--timeout must be a positive"),
    ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        ddp.parse_args(argv)
    assert re.search(match, capsys.readouterr().err)
