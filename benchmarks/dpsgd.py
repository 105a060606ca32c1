"""One DP-SGD step (clip, noise, optimizer step), goodfellow against Opacus, as ratios in one run.

Usage (from the repository root)::

    python -m benchmarks.dpsgd [--quick] [--device cpu|cuda] [--out benchmarks/results_dpsgd.json]
                               [--threads 1] [--runs 15] [--quiet-wait 120]

A full run writes ``benchmarks/results_dpsgd.json``; ``--quick`` (11 timed steps, no waiting for
a quiet machine) writes under ``benchmarks/_scratch/``.

Contenders, each timed from the input batch to updated parameters:

* ``goodfellow_hooks``: ``PerExampleGradients`` attached to the model, ``pe.backward(loss)``
  (the backward to the recorded outputs only: no summed weight gradient, which the update
  replaces), then ``private_mean(recorded_factors(pe), C, sigma, B)``, ``assign_grads`` and
  ``optimizer.step()``: the factored route of tutorial 11, no ``n * P`` tensor formed;
* ``goodfellow_mlp_factors`` (MLPs only): ``goodfellow.MLP``, ``autograd.grad`` to the layer outputs
  only (no weight gradients), ``private_mean(mlp_factors(...))``, the same step;
* ``opacus_hooks``: ``PrivacyEngine.make_private`` in its default mode (hooks store
  ``p.grad_sample``), ``loss.backward()``, ``optimizer.step()`` (clip, sum, noise, divide, step);
* ``opacus_ghost``: ``make_private(grad_sample_mode="ghost")`` (ghost clipping: norms without
  per-example gradients, then a second, reweighted backward), the loss through its criterion.

Every method is first checked with noise 0: the parameter change of one step must equal
``-lr * sum_i clip_C(g_i) / B`` from a naive per-example loop run in float64 (the methods, in
float32, within 1e-4 relative to the largest entry, plus Opacus' own 1e-6 in its clip factor).
Then, as in :mod:`benchmarks.run`, every method (with noise multiplier 1) is warmed up and timed
in rounds, one step each, over and over (each round in a new random order, each timed step right
after two untimed ones of the same method), with the previous step's gradients dropped outside
the timer; times are medians. The target of
the issue: goodfellow at least 1.5x faster than the fastest Opacus mode, per configuration.

A configuration whose model a contender cannot handle yet (the recorder and convolutions, before
the convolution rule lands) is recorded as skipped, with the reason, and does not stop the run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import goodfellow as gf
from benchmarks.run import (
    ORDER_SEED,
    ForeignLoad,
    _synchronize,
    _versions,
    device_name,
    prime,
    priming_steps,
    wait_for_quiet,
    warm_up,
)
from goodfellow.privacy import private_mean

REPO = Path(__file__).resolve().parent.parent
FULL_RUNS, QUICK_RUNS, WARMUP = 15, 11, 3
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.05
TARGET_SPEEDUP = 1.5
OPACUS_METHODS = ("opacus_hooks", "opacus_ghost")
GOODFELLOW_METHODS = ("goodfellow_hooks", "goodfellow_mlp_factors")


class SkipMethodError(Exception):
    """A method cannot run this configuration (yet); the reason goes into the record."""


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    n: int
    input_shape: tuple[int, ...]
    build: Callable[[], nn.Sequential]
    mlp_widths: tuple[int, ...] | None = None
    """Layer widths when the model is an MLP (then goodfellow.MLP can stand in for it)."""

    @property
    def label(self) -> str:
        return f"{self.name}/n{self.n}"


def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        if k > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


MNIST_WIDTHS = (784, 256, 256, 10)
CONFIGS = (
    Config("mnist-mlp", 128, (784,), lambda: _mlp(MNIST_WIDTHS), MNIST_WIDTHS),
    Config("cnn-mnist", 128, (1, 28, 28), _cnn),
)


def config_by_label(label: str) -> Config:
    for config in CONFIGS:
        if config.label == label:
            return config
    raise ValueError(f"unknown configuration {label!r}; choose from {[c.label for c in CONFIGS]}.")


class Problem:
    """A configuration's model, batch, clipping norm and the naive reference of one step."""

    def __init__(self, config: Config, device: torch.device, seed: int = 0) -> None:
        self.config = config
        self.device = device
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = config.build().to(device)
        self.inputs = torch.randn(config.n, *config.input_shape, generator=generator).to(device)
        self.targets = torch.randint(10, (config.n,), generator=generator).to(device)
        self.expected_batch_size = config.n  # a fixed batch: B = n, as Opacus infers it
        # In float64, as benchmarks.methods.Problem's reference (max pooling, see there).
        per_example = gf.naive_per_example_grads(
            copy.deepcopy(self.model).double(), nn.CrossEntropyLoss(reduction="sum"),
            self.inputs.double(), self.targets,
        )  # [(n, *p.shape), ...] in float64
        flat = torch.cat([g.flatten(1) for g in per_example], dim=1)  # (n, P)
        norms = flat.norm(dim=1)  # (n,)
        # Clip at the median norm, so that about half of the examples are clipped.
        self.max_norm = float(norms.median())
        factors = (self.max_norm / norms).clamp(max=1.0)  # (n,)
        self.reference_update = [
            (-LEARNING_RATE * torch.einsum("n,n...->...", factors, g) / self.expected_batch_size)
            .float()
            for g in per_example
        ]  # [p.shape, ...]: the parameter change of one noiseless step

    def model_copy(self) -> nn.Sequential:
        return copy.deepcopy(self.model)


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Method:
    name: str
    description: str
    approximation = 0.0
    """Relative deviation the method makes on purpose, added to the check's tolerance."""

    def __init__(self, problem: Problem, noise_multiplier: float) -> None:
        self.problem = problem
        self.noise_multiplier = noise_multiplier

    def parameters(self) -> list[Tensor]:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop the previous step's gradients (not timed)."""


class GoodfellowHooks(Method):
    name = "goodfellow_hooks"
    description = (
        "PerExampleGradients, pe.backward(loss), private_mean(recorded_factors), assign_grads, SGD"
    )

    def __init__(self, problem: Problem, noise_multiplier: float) -> None:
        super().__init__(problem, noise_multiplier)
        self.model = problem.model_copy()
        try:
            self.recorder = gf.PerExampleGradients(self.model, loss_reduction="mean").attach()
        except ValueError as error:
            if "records only nn.Linear" in str(error):
                raise SkipMethodError(f"goodfellow.PerExampleGradients: {error}") from error
            raise
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.generator = torch.Generator(problem.device).manual_seed(1)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def step(self) -> None:
        p = self.problem
        self.recorder.backward(F.cross_entropy(self.model(p.inputs), p.targets))
        update = private_mean(
            gf.recorded_factors(self.recorder),
            p.max_norm,
            self.noise_multiplier,
            p.expected_batch_size,
            generator=self.generator,
        )
        gf.assign_grads(self.model, update)
        self.optimizer.step()

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class GoodfellowMlpFactors(Method):
    name = "goodfellow_mlp_factors"
    description = "goodfellow.MLP, autograd.grad to the layer outputs, private_mean(mlp_factors)"

    def __init__(self, problem: Problem, noise_multiplier: float) -> None:
        super().__init__(problem, noise_multiplier)
        widths = problem.config.mlp_widths
        if widths is None:
            raise SkipMethodError(
                "not an MLP: goodfellow.MLP and mlp_factors apply to chains of Linear layers"
            )
        self.mlp = gf.MLP(widths[0], list(widths[1:-1]), widths[-1]).to(problem.device)
        with torch.no_grad():  # the weights of the configuration's model
            linears = [m for m in problem.model if isinstance(m, nn.Linear)]
            for ours, theirs in zip(self.mlp.layers, linears):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        self.optimizer = torch.optim.SGD(self.mlp.parameters(), lr=LEARNING_RATE)
        self.generator = torch.Generator(problem.device).manual_seed(1)

    def parameters(self) -> list[Tensor]:
        return list(self.mlp.parameters())

    def step(self) -> None:
        p = self.problem
        prediction, activations, linear_combs = self.mlp(p.inputs)
        loss = F.cross_entropy(prediction, p.targets, reduction="sum")
        # The gradient w.r.t. the layer outputs only: no weight-gradient products are wasted.
        linear_grads = torch.autograd.grad(loss, linear_combs)
        factors = gf.mlp_factors([a.detach() for a in activations], linear_grads)
        update = private_mean(
            factors,
            p.max_norm,
            self.noise_multiplier,
            p.expected_batch_size,
            generator=self.generator,
        )
        gf.assign_grads(self.mlp, update)
        self.optimizer.step()

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class _Opacus(Method):
    mode = "hooks"
    # Opacus clips with C / (||g_i|| + 1e-6) instead of C / ||g_i||.
    approximation = 1e-5

    def __init__(self, problem: Problem, noise_multiplier: float) -> None:
        super().__init__(problem, noise_multiplier)
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        model = problem.model_copy()
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        # The loader only tells the engine the sampling rate (1) and the batch size (n); the
        # timed steps feed the batch directly.
        loader = DataLoader(
            TensorDataset(problem.inputs, problem.targets), batch_size=problem.config.n
        )
        engine = PrivacyEngine(accountant="rdp")
        options = {"criterion": nn.CrossEntropyLoss()} if self.mode == "ghost" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=problem.max_norm,
                poisson_sampling=False,
                grad_sample_mode=self.mode,
                **options,
            )
        self.wrapped, self.optimizer = made[0], made[1]
        self.criterion = made[2] if self.mode == "ghost" else nn.CrossEntropyLoss()
        self.model = model
        assert self.optimizer.expected_batch_size == problem.expected_batch_size

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def step(self) -> None:
        p = self.problem
        self.criterion(self.wrapped(p.inputs), p.targets).backward()
        self.optimizer.step()

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class OpacusHooks(_Opacus):
    name = "opacus_hooks"
    description = "Opacus PrivacyEngine, hooks mode (p.grad_sample), DPOptimizer.step"
    mode = "hooks"


class OpacusGhost(_Opacus):
    name = "opacus_ghost"
    description = "Opacus PrivacyEngine, ghost clipping (two backwards, no grad_sample)"
    mode = "ghost"


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (GoodfellowHooks, GoodfellowMlpFactors, OpacusHooks, OpacusGhost)
}


def check(method: Method, tolerance: float = 1e-4) -> float:
    """One noiseless step from the problem's weights; compare the change with the naive loop."""
    before = [p.detach().clone() for p in method.parameters()]
    method.reset()
    method.step()
    _synchronize(method.problem.device)
    worst = 0.0
    expected = method.problem.reference_update
    actual = [p.detach() - b for p, b in zip(method.parameters(), before)]
    if len(actual) != len(expected):
        raise AssertionError(f"{method.name}: {len(actual)} parameters, expected {len(expected)}.")
    for index, (a, e) in enumerate(zip(actual, expected)):
        scale = float(e.abs().max()) or 1.0
        deviation = float((a - e).abs().max()) / scale
        worst = max(worst, deviation)
        if not deviation <= tolerance + method.approximation:
            raise AssertionError(
                f"{method.name}: parameter {index}'s update deviates from the naive loop by "
                f"{deviation:.2e} (relative to its largest entry)."
            )
    return worst


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def benchmark_config(
    config: Config, device: torch.device, runs: int, warmup: int, quiet_wait: float = 0.0
) -> list[dict]:
    """Check, warm up and time every method on one configuration; one record per method.

    Args:
        quiet_wait: Before timing, wait up to this many seconds for a moment in which other
            processes use less than 25% of the CPU (0: do not wait).
    """
    problem = Problem(config, device)
    base = {
        "config": config.label,
        "n": config.n,
        "device": device.type,
        "torch": torch.__version__,
    }
    records: list[dict] = []
    methods: list[Method] = []
    deviations: dict[str, float] = {}
    for name, cls in METHODS.items():
        try:
            deviations[name] = check(cls(problem, 0.0))
            methods.append(cls(problem, NOISE_MULTIPLIER))
        except SkipMethodError as reason:
            records.append({**base, "method": name, "skipped": str(reason)})
    priming = {m.name: priming_steps(warm_up(m, warmup, device)) for m in methods}
    _synchronize(device)
    times: dict[str, list[float]] = {method.name: [] for method in methods}
    waited = wait_for_quiet(0.25, quiet_wait) if quiet_wait > 0 else 0.0
    foreign = ForeignLoad()
    foreign.start()
    gc.collect()
    gc.disable()
    order = random.Random(ORDER_SEED)
    try:
        for _ in range(runs):
            for method in order.sample(methods, len(methods)):  # a new order every round
                prime(method, priming[method.name])  # the timed step follows its own steps
                _synchronize(device)
                start = time.perf_counter()
                method.step()
                _synchronize(device)
                times[method.name].append(time.perf_counter() - start)
            gc.collect()
    finally:
        gc.enable()
    foreign_share = foreign.share()
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    opacus = [medians[name] for name in OPACUS_METHODS if name in medians]
    fastest_opacus = min(opacus) if opacus else None
    for method in methods:
        samples = times[method.name]
        records.append(
            {
                **base,
                "method": method.name,
                "description": method.description,
                "median_s": medians[method.name],
                "min_s": min(samples),
                "max_s": max(samples),
                "runs": len(samples),
                "priming_steps": priming[method.name],
                "threads": torch.get_num_threads(),
                "noise_multiplier": NOISE_MULTIPLIER,
                "max_norm": problem.max_norm,
                "expected_batch_size": problem.expected_batch_size,
                "num_params": sum(p.numel() for p in problem.model.parameters()),
                "check_deviation": deviations[method.name],
                "foreign_cpu_share": foreign_share,
                "quiet_wait_s": waited,
                # > 1: faster than the fastest Opacus mode of this run
                "speedup_over_fastest_opacus": (
                    fastest_opacus / medians[method.name] if fastest_opacus else None
                ),
                "times_s": samples,
            }
        )
    return records


def targets(records: list[dict]) -> list[dict]:
    """Per configuration: goodfellow's best speed-up over the fastest Opacus mode, verdict."""
    rows = []
    for label in dict.fromkeys(r["config"] for r in records):
        timed = {r["method"]: r for r in records if r["config"] == label and "median_s" in r}
        ours = [timed[m] for m in GOODFELLOW_METHODS if m in timed]
        theirs = [timed[m] for m in OPACUS_METHODS if m in timed]
        row: dict = {"config": label, "required_speedup": TARGET_SPEEDUP}
        if not ours or not theirs:
            skipped = [r for r in records if r["config"] == label and "skipped" in r]
            row.update(
                met=None, reason="; ".join(f"{r['method']}: {r['skipped']}" for r in skipped)
            )
        else:
            best, fastest = (
                min(ours, key=lambda r: r["median_s"]),
                min(theirs, key=lambda r: r["median_s"]),
            )
            speedup = fastest["median_s"] / best["median_s"]
            row.update(
                goodfellow_method=best["method"],
                fastest_opacus=fastest["method"],
                speedup=speedup,
                speedup_per_method={r["method"]: fastest["median_s"] / r["median_s"] for r in ours},
                met=speedup >= TARGET_SPEEDUP,
            )
        rows.append(row)
    return rows


def summary(results: dict) -> str:
    lines = [
        f"one DP-SGD step ({results['meta']['device_name']}, {results['meta']['threads']} threads):"
    ]
    for r in results["records"]:
        if "skipped" in r:
            lines.append(f"  {r['config']:16s} {r['method']:24s} skipped: {r['skipped']}")
        else:
            lines.append(
                f"  {r['config']:16s} {r['method']:24s} {r['median_s'] * 1e3:8.2f} ms  "
                f"x{r['speedup_over_fastest_opacus']:.2f} vs fastest Opacus"
            )
    for row in results["targets"]:
        if row["met"] is None:
            lines.append(f"  target {row['config']}: not measured ({row['reason']})")
        else:
            verdict = "MET " if row["met"] else "MISS"
            lines.append(
                f"  {verdict} {row['config']}: {row['goodfellow_method']} {row['speedup']:.2f}x "
                f"faster than {row['fastest_opacus']} (required {TARGET_SPEEDUP}x)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dpsgd", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_RUNS} timed steps, scratch output"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="where to write the results JSON")
    parser.add_argument("--runs", type=int, default=None, help="timed steps per method")
    parser.add_argument("--configs", nargs="+", default=[c.label for c in CONFIGS])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own choice); 1 keeps a busy shared machine from "
        "stalling every parallel kernel on a descheduled thread",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="seconds to wait, before each configuration, for other processes to leave the CPU "
        "mostly idle (default: 120 for a full run, 0 with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 120.0
    if args.out is None:
        suffix = "" if args.device == "cpu" else f"_{args.device}"
        args.out = (
            REPO / "benchmarks" / "_scratch" / f"results_dpsgd{suffix}_quick.json"
            if args.quick
            else REPO / "benchmarks" / f"results_dpsgd{suffix}.json"
        )
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else FULL_RUNS
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    for label in args.configs:
        config_by_label(label)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine.")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    load_before = os.getloadavg()
    records = []
    for label in args.configs:
        config = config_by_label(label)
        records += benchmark_config(config, device, args.runs, WARMUP, args.quiet_wait)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": device.type,
            "device_name": device_name(device),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
            "quick": args.quick,
            "runs": args.runs,
            "warmup": WARMUP,
            "quiet_wait_s": args.quiet_wait,
            "noise_multiplier": NOISE_MULTIPLIER,
            "learning_rate": LEARNING_RATE,
            "load_average": [load_before, os.getloadavg()],
        },
        "records": records,
    }
    results["targets"] = targets(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    shown = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    print(f"wrote {shown}")
    print(summary(results))


if __name__ == "__main__":
    main()
