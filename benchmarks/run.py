"""Check and time every method on every configuration; write results.json and the figures.

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--out benchmarks/results.json]

The parent process runs the benchmark twice, each time in a fresh subprocess: once with torch's
default CPU allocator and once with ``THP_MEM_ALLOC_ENABLE=1`` (torch then backs large allocations
with transparent huge pages; the variable is read once per process, hence the subprocess). On
CUDA only the default setting is run: the variable concerns host memory.

Inside one subprocess, for each configuration:

1. every method runs once and its result is checked against the naive per-example loop run in
   float64 (:func:`benchmarks.methods.check`); a wrong method stops the benchmark;
2. every method is warmed up, then the methods are timed in rounds (one step of each, repeated
   ``--runs`` times), so that a change in the machine's load hits all of them alike; each round
   runs them in a new random order (seeded), and every timed step comes right after untimed
   steps of the same method, as in a training loop: at least two, and at least 50 ms of them
   (:func:`priming_steps`, counted from the warm-up's fastest step);
3. one more step of each method measures its peak extra memory.

A full run writes ``benchmarks/results.json`` and the figures and tables of the docs' Benchmarks
page (``docs/_static/benchmarks``). ``--quick`` runs three small configurations and writes under
``benchmarks/_scratch/`` so it never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import methods as bm
from goodfellow._accounting import CHECK_EVERY

REPO = Path(__file__).resolve().parent.parent
FULL_RUNS, FULL_WARMUP = 15, 3
QUICK_RUNS, QUICK_WARMUP = 11, 3
ALLOCATORS = {"default": None, "thp": "1"}
"""Allocator setting -> value of THP_MEM_ALLOC_ENABLE in the subprocess (None: unset)."""
ORDER_SEED = 0  # of the random order of the methods in each timed round
PRIMING_STEPS = 2
"""The fewest untimed steps of a method right before each of its timed steps (see
:func:`priming_steps` for how many more a fast method gets)."""
PRIMING_SECONDS = 0.05
"""Untimed work of a method's own before each of its timed steps, at least: on the machine of the
2026-12-02 runs a step that writes tens of MiB right after other work (another method, a pause, a
``gc.collect()``) runs up to 4x slower and takes 20-50 ms of its own steps to settle
(``benchmarks/README.md``, "One process, in rounds"), so two steps of a 1-3 ms method are not yet
the training loop the timed step stands for."""
MAX_PRIMING_STEPS = 200
"""No more untimed steps than this, however fast the step (a shape-only run on ``meta``)."""


def priming_steps(step_seconds: float, check_every: int = CHECK_EVERY) -> int:
    """How many untimed steps come before each timed step of a method taking ``step_seconds``.

    At least :data:`PRIMING_STEPS` and enough for :data:`PRIMING_SECONDS`, and a count ``k``
    with ``k + 1`` coprime to ``check_every``: the recorder checks its sums against autograd's on
    every ``check_every``-th batch (``goodfellow._accounting``), and with ``k + 1`` steps per
    round a timed step then carries that check once in ``check_every`` rounds, as in training
    (with ``k + 1 = 2`` or ``5``, one in two or five; with ``10``, every time or never).
    """
    counts = [
        k for k in range(PRIMING_STEPS, MAX_PRIMING_STEPS + 1) if math.gcd(k + 1, check_every) == 1
    ]
    return next((k for k in counts if k * step_seconds >= PRIMING_SECONDS), counts[-1])


def prime(method: bm.Method, steps: int = PRIMING_STEPS) -> None:  # or any reset() + step()
    """``steps`` untimed steps before a timed one, and the reset before it.

    The timed step then finds the caches and the allocator's free lists as its own previous
    step left them, as in a training loop: timed right after another method, a light step
    pays for what a heavy one left behind. ``run``, ``dpsgd`` and ``ddp`` give each method
    :func:`priming_steps` (in ``ddp`` the larger count of the two ranks, which must agree).
    """
    for _ in range(steps):
        method.reset()
        method.step()
    method.reset()


def _timed_step(method: bm.Method, device: torch.device) -> float:
    """Seconds of one step of ``method`` (untimed in the results: for :func:`priming_steps`)."""
    _synchronize(device)
    start = time.perf_counter()
    method.step()
    _synchronize(device)
    return time.perf_counter() - start


def warm_up(method: bm.Method, steps: int, device: torch.device) -> float:
    """``steps`` untimed steps of ``method``; the fastest one's seconds (``inf`` for none).

    What :func:`priming_steps` counts from; with no warm-up a method gets the fewest,
    :data:`PRIMING_STEPS`.
    """
    fastest = float("inf")
    for _ in range(steps):
        method.reset()
        fastest = min(fastest, _timed_step(method, device))
    return fastest


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel handed out on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_extra_mb(method: bm.Method) -> float:
    """Peak memory of a step above what the process held before it, plus the kept workspace.

    The peak of the tensor memory the step allocated, less what it freed, in the order it
    happened: on CPU from torch's own allocator events (:func:`allocated_peak_bytes`), on CUDA
    the rise of ``torch.cuda.max_memory_allocated``. Buffers a method keeps across steps
    (``out=`` workspaces) count too, since the method needs them. The smaller of two
    consecutive steps: the recorder checks its sums against autograd's on every 10th batch
    (``goodfellow._accounting``), and such a batch also holds every parameter's summed
    gradient; after the first three, two consecutive batches are never both checked, so this
    is the memory of an ordinary step.
    """
    extras = [_step_extra_bytes(method) for _ in range(2)]
    return (max(min(extras), 0) + method.workspace_bytes) / 2**20


def _step_extra_bytes(method: bm.Method) -> int:
    """The rise in memory during one step of ``method``, its previous records released first."""
    device = method.problem.device
    method.reset()
    method.release()
    gc.collect()
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        method.step()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return allocated_peak_bytes(method.step)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocated_peak_bytes(step: Callable[[], object]) -> int:
    """The peak of the CPU tensor memory ``step`` holds, allocated by it, at any moment of it.

    Read from ``torch.profiler`` with ``profile_memory=True``: every allocation and every free
    of torch's CPU allocator, attributed to the operator that made it (an operator's own
    change, its sub-operators' apart), counted at the operator's start when it allocates and
    at its end when it frees, in time order. Unlike the resident set of the process, this
    does not depend on what the C heap kept from earlier steps or hands back to the kernel.
    Memory allocated before the step and freed during it does not count (the profiler does
    not know its size): :meth:`benchmarks.methods.Method.release` drops a method's records of
    the previous step before the measured one.
    """
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = []
    for event in prof.events():
        change = event.self_cpu_memory_usage
        if change:
            changes.append((event.time_range.start if change > 0 else event.time_range.end, change))
    held = peak = 0
    for _, change in sorted(changes):
        held += change
        peak = max(peak, held)
    return peak


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int:
    """CPU time this process (all its threads) has used, in clock ticks."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class ForeignLoad:
    """Share of the machine's CPU time used by *other* processes between start() and share()."""

    def start(self) -> None:
        self.machine, self.own = _cpu_jiffies(), _own_jiffies()

    def share(self) -> float | None:
        machine, own = _cpu_jiffies(), _own_jiffies()
        if machine is None or self.machine is None or machine[1] == self.machine[1]:
            return None
        foreign = (machine[0] - self.machine[0]) - (own - self.own)
        return max(foreign, 0) / (machine[1] - self.machine[1])


def wait_for_quiet(max_share: float, timeout: float, window: float = 2.0) -> float:
    """Wait until other processes use less than ``max_share`` of the CPU over ``window`` seconds.

    The machine is shared; starting a configuration in a quiet moment keeps its timings from
    being dominated by someone else's work. Gives up after ``timeout`` seconds.

    Returns:
        The seconds waited.
    """
    start = time.perf_counter()
    load = ForeignLoad()
    while True:
        load.start()
        time.sleep(window)
        share = load.share()
        waited = time.perf_counter() - start
        if share is None or share < max_share or waited >= timeout:
            return waited


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def benchmark_config(
    config: bm.Config,
    device: torch.device,
    runs: int,
    warmup: int,
    method_names: list[str],
    allocator: str,
    progress=None,
    quiet_wait: float = 0.0,
) -> list[dict]:
    """Check, warm up, time and measure every method on one configuration.

    Args:
        quiet_wait: Before timing, wait up to this many seconds for a moment in which other
            processes use less than 25% of the CPU (0: do not wait).

    Returns:
        One record per method (see ``benchmarks/README.md`` for the fields).
    """
    problem = bm.Problem(config, device)
    methods = [bm.METHODS[name](problem) for name in bm.methods_for(config, method_names)]
    deviations, fastest = {}, {}
    for method in methods:
        method.reset()
        fastest[method.name] = _timed_step(method, device)
        deviations[method.name] = bm.check(method)
        method.reset()
    problem.reference = None  # n * P floats no longer needed: free them before timing
    for method in methods:
        fastest[method.name] = min(fastest[method.name], warm_up(method, warmup, device))
    priming = {name: priming_steps(seconds) for name, seconds in fastest.items()}

    times: dict[str, list[float]] = {method.name: [] for method in methods}
    faults: dict[str, list[int]] = {method.name: [] for method in methods}
    waited = wait_for_quiet(0.25, quiet_wait) if quiet_wait > 0 else 0.0
    foreign = ForeignLoad()
    foreign.start()
    gc.collect()
    gc.disable()
    order = random.Random(ORDER_SEED)
    try:
        for _ in range(runs):
            # every round in a new order, against drift; each timed step after primed ones
            for method in order.sample(methods, len(methods)):
                prime(method, priming[method.name])
                _synchronize(device)
                faults_before = _minor_faults()
                start = time.perf_counter()
                method.step()
                _synchronize(device)
                times[method.name].append(time.perf_counter() - start)
                faults[method.name].append(_minor_faults() - faults_before)
                if progress is not None:
                    progress.update(1)
            gc.collect()
    finally:
        gc.enable()
    foreign_share = foreign.share()
    peaks = {method.name: peak_extra_mb(method) for method in methods}
    for method in methods:
        method.reset()

    plain = statistics.median(times["plain_backward"]) if "plain_backward" in times else None
    records = []
    for method in methods:
        samples = times[method.name]
        median = statistics.median(samples)
        record = {
            "config": config.label,
            "method": method.name,
            "median_s": median,
            "min_s": min(samples),
            "max_s": max(samples),
            "runs": len(samples),
            "n": config.n,
            "widths": list(config.widths),
            "device": device.type,
            "torch": torch.__version__,
            "allocator": allocator,
            "ratio_to_plain_backward": median / plain if plain else None,
            "num_params": config.num_params,
            "per_example_mb": config.per_example_mb,
            "threads": torch.get_num_threads(),
            "check_deviation": deviations[method.name],
            "foreign_cpu_share": foreign_share,
            "quiet_wait_s": waited,
            "times_s": samples,
            "minor_faults_per_step": statistics.median(faults[method.name]),
            "priming_steps": priming[method.name],
        }
        record["peak_mem_mb"] = peaks[method.name]
        records.append(record)
    return records


def run_setting(args: argparse.Namespace) -> dict:
    """Benchmark every configuration under the allocator setting of this process."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine.")
    expected = ALLOCATORS[args.child]
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != expected:
        raise SystemExit(f"allocator {args.child!r} needs THP_MEM_ALLOC_ENABLE={expected}.")
    from tqdm import tqdm

    configs = [bm.config_by_label(label) for label in args.configs]
    method_names = list(bm.METHODS) if args.methods is None else args.methods
    load_before = os.getloadavg()
    records = []
    with tqdm(
        total=len(configs) * len(method_names) * args.runs,
        desc=f"{device.type}/{args.child}",
        unit="step",
        dynamic_ncols=True,
    ) as progress:
        for config in configs:
            progress.set_postfix_str(config.label)
            records += benchmark_config(
                config, device, args.runs, args.warmup, method_names, args.child, progress,
                quiet_wait=args.quiet_wait,
            )
    return {
        "allocator": args.child,
        "device_name": device_name(device),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "records": records,
    }


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("opacus", "backpack-for-pytorch", "goodfellow"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal here
            versions[package] = None
    return versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="three small configurations, 11 runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="where to write the results JSON")
    parser.add_argument("--figures-dir", type=Path, default=None, help="where figures/tables go")
    parser.add_argument("--runs", type=int, default=None, help="timed steps per method (>= 7)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first")
    parser.add_argument("--configs", nargs="+", default=None, help="labels, e.g. mnist-mlp/n512")
    parser.add_argument(
        "--conv", action="store_true",
        help="with --quick: add the conv configurations cnn-mnist/n128 and 3c3d/n64",
    )
    parser.add_argument(
        "--lm", action="store_true",
        help="with --quick: add the language models tiny-lm/T64-n32, tiny-lm/T256-n8 and "
        "tiny-lm-mha/T64-n32",
    )
    parser.add_argument("--methods", nargs="+", default=None, choices=list(bm.METHODS))
    parser.add_argument(
        "--allocators", nargs="+", default=None, choices=list(ALLOCATORS),
        help="allocator settings to run (default: both on CPU, default only on CUDA)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=None,
        help="seconds to wait, before each configuration, for other processes to leave the "
        "CPU mostly idle (default: 120 for a full run, 0 with --quick)",
    )
    parser.add_argument(
        "--report-only", action="store_true",
        help="do not benchmark: redraw the figures and tables from an existing --out",
    )
    parser.add_argument("--child", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    scratch = REPO / "benchmarks" / "_scratch"
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    if args.out is None:
        args.out = (
            scratch / f"results{suffix}_quick.json"
            if args.quick
            else REPO / "benchmarks" / f"results{suffix}.json"
        )
    if args.figures_dir is None:
        args.figures_dir = (
            scratch / "figures" if args.quick else REPO / "docs" / "_static" / "benchmarks"
        )
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else FULL_RUNS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else FULL_WARMUP
    if args.configs is None:
        args.configs = [c.label for c in (bm.QUICK_CONFIGS if args.quick else bm.CONFIGS)]
        if args.quick and args.conv:
            args.configs += [c.label for c in bm.CONV_CONFIGS]
        if args.quick and args.lm:
            args.configs += [c.label for c in bm.LM_CONFIGS]
    for label in args.configs:
        bm.config_by_label(label)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 120.0
    if args.allocators is None:
        args.allocators = list(ALLOCATORS) if args.device == "cpu" else ["default"]
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from benchmarks import report

    if args.child is not None:
        result = run_setting(args)
        args.out.write_text(json.dumps(result))
        return
    if not args.report_only:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: torch.cuda.is_available() is False here (this torch is "
                f"{torch.__version__}); run on a machine with a GPU and a CUDA build of torch."
            )
        settings = []
        for allocator in args.allocators:
            env = dict(os.environ)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if ALLOCATORS[allocator] is not None:
                env["THP_MEM_ALLOC_ENABLE"] = ALLOCATORS[allocator]
            with tempfile.TemporaryDirectory() as tmp:
                child_out = Path(tmp) / "setting.json"
                command = [
                    sys.executable, "-m", "benchmarks.run", "--child", allocator,
                    "--device", args.device, "--out", str(child_out),
                    "--runs", str(args.runs), "--warmup", str(args.warmup),
                    "--configs", *args.configs, "--quiet-wait", str(args.quiet_wait),
                ]
                if args.methods is not None:
                    command += ["--methods", *args.methods]
                subprocess.run(command, env=env, cwd=REPO, check=True)
                settings.append(json.loads(child_out.read_text()))
        results = {
            "meta": {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "device": args.device,
                "device_name": settings[0]["device_name"],
                "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "versions": _versions(),
                "quick": args.quick,
                "runs": args.runs,
                "warmup": args.warmup,
                "load_average": {
                    s["allocator"]: [s["load_average_before"], s["load_average_after"]]
                    for s in settings
                },
            },
            "records": [record for s in settings for record in s["records"]],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    results = json.loads(args.out.read_text())
    written = report.write_all(results, args.figures_dir)
    for path in written:
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(report.targets_text(results))


if __name__ == "__main__":
    main()
