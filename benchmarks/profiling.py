"""Where each method spends its time: ``torch.profiler`` tables and page-fault counts.

Usage (from the repository root)::

    python -m benchmarks.profiling [--config mnist-mlp/n512] [--methods ...] [--steps 5]

For every method it prints the operators with the most self time over ``--steps`` steps, and the
number of minor page faults per step (``getrusage``): a fault is the kernel handing the process a
fresh page on its first touch, which is where a freshly allocated result's time goes. Run it once
with ``THP_MEM_ALLOC_ENABLE=1`` and once without to see the allocator's share.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import methods as bm


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_method(method: bm.Method, steps: int, rows: int) -> str:
    device = method.problem.device
    for _ in range(2):
        method.reset()
        method.step()
    faults, seconds = [], []
    for _ in range(steps):
        method.reset()
        before, start = minor_faults(), time.perf_counter()
        method.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        faults.append(minor_faults() - before)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            method.reset()
            method.step()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    seconds.sort()
    header = (
        f"== {method.name}: median {seconds[len(seconds) // 2] * 1e3:.2f} ms/step, "
        f"{sorted(faults)[len(faults) // 2]} minor page faults/step "
        f"({sorted(faults)[len(faults) // 2] * 4 / 1024:.0f} MiB in 4 KiB pages)"
    )
    return f"{header}\n{table}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("--config", default="mnist-mlp/n512")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(bm.METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    problem = bm.Problem(bm.config_by_label(args.config), args.device)
    allocator = "thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "default"
    print(
        f"# {args.config}, {args.device}, allocator {allocator}, "
        f"n * P = {problem.config.per_example_mb:.0f} MiB of per-example gradients"
    )
    for name in bm.methods_for(problem.config, args.methods):
        method = bm.METHODS[name](problem)
        print(profile_method(method, args.steps, args.rows), flush=True)
        del method


if __name__ == "__main__":
    main()
