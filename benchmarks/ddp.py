"""One DistributedDataParallel training step with and without each statistic, on 2 gloo ranks.

Usage (from the repository root)::

    python -m benchmarks.ddp [--quick] [--out benchmarks/results_ddp.json] [--runs 101]
                             [--launches 5] [--warmup 5] [--batch 64] [--widths 64 256 256 10]

The parent process starts two ranks (``gloo`` on 127.0.0.1, a free port, one CPU thread each)
and waits for them with a timeout; a rank that fails or hangs fails the benchmark. A process
group timeout makes a rank whose partner died give up as well. A full run writes
``benchmarks/results_ddp.json``; ``--quick`` (one launch of 31 timed steps, no waiting for a quiet
machine) writes under ``benchmarks/_scratch/``.

Every rank holds ``--batch`` examples of scikit-learn's digits (its own share of a global batch
of ``2 * batch``) and a small MLP wrapped in ``DistributedDataParallel``. The methods, each timed
from the input batch to updated parameters:

* ``ddp_plain``: forward, ``loss.backward()`` (DDP all-reduces the gradient), SGD step;
* ``ddp_clipped_mean``: ``PerExampleGradients`` on the DDP model, backward under ``no_sync()``
  (no gradient all-reduce), ``clipped_mean(recorded_factors(pe), C, group=WORLD)`` (one
  all-reduce of the factored clipped sums), ``assign_grads``, SGD step;
* ``ddp_variance``: the plain step plus ``gradient_variance(recorded_factors(pe), group=WORLD)``;
* ``ddp_noise_scale_hook``: the plain step with :class:`goodfellow.NoiseScaleHook` registered
  (its communication hook replaces DDP's default all-reduce), and its noise scale read;
* ``ddp_torch_allreduce_hook`` (diagnostic, no target): the plain step with torch's own
  Python ``allreduce_hook`` registered, which does what DDP's built-in C++ all-reduce does:
  the share of ``ddp_noise_scale_hook``'s cost that any Python communication hook pays;
* ``ddp_ekfac``: the plain forward and backward, then ``EKFAC(ddp_model, lr, group=WORLD)``'s
  step (Kronecker factors averaged over the ranks; eigenbases every ``update_freq`` steps).

Protocol, as in :mod:`benchmarks.run`: every method's first step is checked against one
process on the concatenated global batch (the naive per-example loop for the clipped mean and
the variance, autograd's mean gradient for the plain steps, a single-process ``EKFAC``); then
the methods are warmed up and timed in rounds, one step each, over and over, so that a change
of the machine's load hits all of them alike; every round runs them in a new random order (the
same on both ranks), and each timed step comes right after two untimed steps of the same method,
so that it finds the caches as its own previous steps left them, as in training.
Both ranks start each step together (a barrier outside the timer); a step's time is the slower
rank's. Times are medians; the check's references and tolerances are those of :func:`check`. A
full run repeats all of this in ``--launches`` fresh pairs of rank processes: a ratio is taken
inside each launch, and the reported one is the median over the launches (a whole launch can be
lucky or unlucky: six single launches of the same code gave the noise-scale hook 1.02-1.17).
Inside a launch every method has ``--instances`` instances (models, DDP reducers, buckets),
timed in turns: two instances of one method can differ by several percent for a whole launch.

Bytes each rank sends per step: every ``torch.distributed`` collective issued from Python (the
library's all-reduces and the noise-scale hook's) is counted by wrapping the functions of
``torch.distributed`` during one extra, untimed step: ``numel * element_size`` of each tensor.
DDP's own gradient all-reduce runs in C++ and is not seen by the wrapper; it is counted as
``P * 4`` bytes (every float32 gradient once) for the steps that run it (not under
``no_sync()``, and not when a communication hook replaces it: the hook's all-reduces are then
counted by the wrapper). This is the payload each rank contributes to the all-reduces; a ring
all-reduce on W ranks sends ``2 (W - 1) / W`` times that per rank, which is exactly the payload
for W = 2.

Targets of issue 15: ``ddp_noise_scale_hook`` <= 1.05x ``ddp_plain``; ``ddp_clipped_mean`` <= 2x
``ddp_plain``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import goodfellow as gf
from benchmarks.run import _versions, device_name, prime, priming_steps, wait_for_quiet, warm_up

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
DIGITS_EXAMPLES, DIGITS_PIXELS, DIGITS_CLASSES = 1797, 64, 10
ORDER_SEED = 0  # of the random order of the methods in each round
FULL_RUNS, QUICK_RUNS = 101, 31  # steps of a few ms on a shared machine: many samples
FULL_LAUNCHES, QUICK_LAUNCHES = 5, 1
"""Fresh pairs of rank processes per run; ratios are medians over them (``build_records``)."""
FULL_WARMUP, QUICK_WARMUP = 5, 3
FULL_INSTANCES, QUICK_INSTANCES = 3, 1
"""Instances of each method per launch, timed in turns (``_measure``)."""
LEARNING_RATE = 0.05
MAX_NORM = 1.0
"""Clipping norm C of ``ddp_clipped_mean`` (digits' per-example norms are about 1-3: most clip)."""
EKFAC_UPDATE_FREQ = 10
TARGETS = {"ddp_noise_scale_hook": 1.05, "ddp_clipped_mean": 2.0}
"""Method -> the largest allowed ratio of its median step to ``ddp_plain``'s."""
PROCESS_GROUP_TIMEOUT_S = 60
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter")


# --------------------------------------------------------------------------------------------
# The problem: a fixed global batch of digits, split into the ranks' shares
# --------------------------------------------------------------------------------------------


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with tanh between them (as examples/ddp_training.py)."""
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        if k > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def num_params(widths: list[int]) -> int:
    """P of :func:`mlp`: a weight and a bias per layer."""
    return sum(d_out * (d_in + 1) for d_in, d_out in zip(widths[:-1], widths[1:]))


def expected_bytes(method: str, widths: list[int], element_size: int = 4) -> int:
    """The bytes a rank sends per step, from the communication each method is documented to do.

    ``clipped_mean`` and ``gradient_variance`` all-reduce their sums and the example count in
    one call (P + 1 numbers), the variance a second call of P squared sums; the noise-scale
    hook appends two scalars, in the gradient's dtype, to the last bucket of DDP's P
    gradients; distributed EKFAC all-reduces, per layer, A ((d_in + 1)^2 with the bias
    column), G (d_out^2) and their two example counts, then the EKFAC scalings
    (d_out (d_in + 1)) and one count.
    """
    p = num_params(widths)
    ddp = p * element_size
    if method == "ddp_plain":
        return ddp
    if method == "ddp_clipped_mean":
        return (p + 1) * element_size  # under no_sync: no gradient all-reduce
    if method == "ddp_variance":
        return ddp + (p + 1) * element_size + p * element_size
    if method == "ddp_noise_scale_hook":
        return ddp + 2 * element_size
    if method == "ddp_torch_allreduce_hook":
        return ddp
    if method == "ddp_ekfac":
        factors = sum(
            ((d_in + 1) ** 2 + d_out**2 + 2) + (d_out * (d_in + 1) + 1)
            for d_in, d_out in zip(widths[:-1], widths[1:])
        )
        return ddp + factors * element_size
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}.")


class Problem:
    """The digits batch of all ranks, this rank's share and the initial weights."""

    def __init__(self, widths: list[int], batch: int, rank: int, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()  # bundled with scikit-learn: no download
        x = torch.tensor(digits.data, dtype=torch.float32)  # (1797, 64)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = torch.tensor(digits.target)  # (1797,)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        chosen = order[: batch * WORLD_SIZE]
        self.inputs, self.targets = x[chosen], y[chosen]  # (2b, 64), (2b,): the global batch
        share = slice(rank * batch, (rank + 1) * batch)
        self.x, self.y = self.inputs[share], self.targets[share]  # (b, 64), (b,)
        self.widths, self.batch = widths, batch
        torch.manual_seed(seed)
        self.net = mlp(widths)

    def fresh_net(self) -> nn.Sequential:
        net = mlp(self.widths)
        net.load_state_dict(self.net.state_dict())
        return net


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


class Method:
    name: str
    description: str
    ddp_allreduce = True
    """Whether DDP's built-in (C++) gradient all-reduce runs in a step: P * 4 bytes."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.net = problem.fresh_net()
        self.model = DistributedDataParallel(self.net)
        self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
            self.model.parameters(), lr=LEARNING_RATE
        )

    def loss(self) -> Tensor:
        return F.cross_entropy(self.model(self.problem.x), self.problem.y)  # mean over b

    def step(self) -> None:
        self.loss().backward()
        self.optimizer.step()

    def reset(self) -> None:
        """Drop the previous step's gradients (not timed)."""
        self.optimizer.zero_grad(set_to_none=True)


class Plain(Method):
    name = "ddp_plain"
    description = "forward, loss.backward() (DDP all-reduce), SGD step"


class ClippedMean(Method):
    name = "ddp_clipped_mean"
    description = (
        "PerExampleGradients on the DDP model, backward under no_sync(), "
        "clipped_mean(recorded_factors, C, group=WORLD), assign_grads, SGD step"
    )
    ddp_allreduce = False

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.recorder = gf.PerExampleGradients(self.model, loss_reduction="mean").attach()

    def step(self) -> None:
        with self.model.no_sync():  # the clipped sums are all-reduced instead of the gradient
            self.loss().backward()
        mean = gf.clipped_mean(gf.recorded_factors(self.recorder), MAX_NORM, group=dist.group.WORLD)
        gf.assign_grads(self.model, mean)
        self.optimizer.step()


class Variance(Method):
    name = "ddp_variance"
    description = "plain DDP step + gradient_variance(recorded_factors, group=WORLD)"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.recorder = gf.PerExampleGradients(self.model, loss_reduction="mean").attach()
        self.variance: object = None

    def step(self) -> None:
        super().step()
        self.variance = gf.gradient_variance(
            gf.recorded_factors(self.recorder), group=dist.group.WORLD
        )


class NoiseScale(Method):
    name = "ddp_noise_scale_hook"
    description = (
        "plain DDP step with goodfellow.NoiseScaleHook as DDP's communication hook, its noise "
        "scale read after every step"
    )
    ddp_allreduce = False  # the hook issues the gradient all-reduce: the wrapper counts it

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.hook = gf.NoiseScaleHook(self.model, batch_size=problem.batch, decay=0.95)

    def step(self) -> None:
        super().step()
        # as a training loop that logs it does; the hook finishes its estimates when read
        self.noise_scale = self.hook.noise_scale


class TorchAllreduceHook(Method):
    name = "ddp_torch_allreduce_hook"
    description = (
        "plain DDP step with torch's own Python allreduce_hook registered: the cost of a Python "
        "communication hook alone, the floor under ddp_noise_scale_hook (diagnostic, no target)"
    )
    ddp_allreduce = False  # the hook issues the gradient all-reduce: the wrapper counts it

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.model.register_comm_hook(None, allreduce_hook)


class Ekfac(Method):
    name = "ddp_ekfac"
    description = (
        f"forward, loss.backward() (DDP all-reduce), EKFAC(ddp_model, lr, group=WORLD).step() "
        f"(factors averaged over the ranks, eigenbases every {EKFAC_UPDATE_FREQ} steps)"
    )

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.optimizer = gf.EKFAC(
            self.model, LEARNING_RATE, update_freq=EKFAC_UPDATE_FREQ, group=dist.group.WORLD
        )


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Plain, ClippedMean, Variance, NoiseScale, TorchAllreduceHook, Ekfac)
}


# --------------------------------------------------------------------------------------------
# Checks against one process on the global batch
# --------------------------------------------------------------------------------------------


def _relative_deviation(actual: list[Tensor], expected: list[Tensor]) -> float:
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        a = a.to(e.dtype)  # the float32 result against the float64 reference
        scale = float(e.abs().max()) or 1.0
        worst = max(worst, float((a - e).abs().max()) / scale)
    return worst


def reference(method: Method) -> list[Tensor]:
    """What one step of one process on the concatenated global batch gives, per parameter.

    For the SGD steps the gradient the step applies (``.grad`` after it: DDP's average, or the
    clipped mean ``assign_grads`` wrote), in float64, so that the deviation the check reports
    is the float32 method's own; comparing parameter changes instead would mostly measure the
    float32 rounding of the parameters. For EKFAC the parameter change of a single-process
    EKFAC step in float32 like the method: with damping 1e-3 the preconditioner amplifies
    float32 round-off to ~1e-3 of a float64 step, which would hide what is checked here, that
    the ranks' averaged factors give the single-process step.
    """
    problem = method.problem
    if isinstance(method, Ekfac):
        net = problem.fresh_net()
        before = [p.detach().clone() for p in net.parameters()]
        optimizer = gf.EKFAC(net, LEARNING_RATE, update_freq=EKFAC_UPDATE_FREQ)
        F.cross_entropy(net(problem.inputs), problem.targets).backward()
        optimizer.step()
        optimizer.remove_hooks()
        return [p.detach() - b for p, b in zip(net.parameters(), before)]
    net = problem.fresh_net().double()
    inputs = problem.inputs.double()  # (2b, 64)
    if isinstance(method, ClippedMean):
        per_example = gf.naive_per_example_grads(
            net, nn.CrossEntropyLoss(), inputs, problem.targets
        )  # [(2b, *p.shape), ...]
        norms = torch.cat([g.flatten(1) for g in per_example], dim=1).norm(dim=1)  # (2b,)
        weights = (MAX_NORM / norms).clamp(max=1.0) / len(norms)  # (2b,)
        return [torch.einsum("n,n...->...", weights, g) for g in per_example]
    # equal shares: DDP's average of the ranks' mean gradients is the global mean gradient
    loss = F.cross_entropy(net(inputs), problem.targets)
    return list(torch.autograd.grad(loss, list(net.parameters())))


def reference_variance(problem: Problem) -> list[Tensor]:
    """The entrywise variance of the global batch's per-example gradients, by the naive loop."""
    per_example = gf.naive_per_example_grads(
        problem.fresh_net().double(), nn.CrossEntropyLoss(), problem.inputs.double(),
        problem.targets,
    )  # [(2b, *p.shape), ...]
    return [g.var(dim=0, unbiased=False) for g in per_example]


def check(method: Method) -> float:
    """Run the method's first step and compare it with one process on the global batch.

    Float32 against :func:`reference`, relative to each parameter's largest entry: 1e-5 for the
    gradients (their float32 error is ~1e-7 here), 1e-4 for EKFAC's parameter change, which
    also holds the float32 rounding of the parameters (|p| / |lr * step| times 6e-8).
    """
    tolerance = 1e-4 if isinstance(method, Ekfac) else 1e-5
    before = [p.detach().clone() for p in method.net.parameters()]
    method.reset()
    method.step()
    if isinstance(method, Ekfac):
        actual = [p.detach() - b for p, b in zip(method.net.parameters(), before)]
    else:
        actual = [p.grad for p in method.net.parameters()]
    deviation = _relative_deviation(actual, reference(method))
    if isinstance(method, Variance):
        variance = method.variance
        variance = list(variance.values() if isinstance(variance, dict) else variance)
        expected = reference_variance(method.problem)
        deviation = max(deviation, _relative_deviation(variance, expected))
    if not deviation <= tolerance:
        raise AssertionError(
            f"{method.name}: the step deviates from one process on the global batch by "
            f"{deviation:.2e} (relative to each parameter's largest entry)."
        )
    return deviation


def ranks_spread(method: Method) -> float:
    """The largest difference of a parameter between the ranks (0: they stay in step)."""
    flat = torch.cat([p.detach().reshape(-1) for p in method.net.parameters()])
    highest, lowest = flat.clone(), flat.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return float((highest - lowest).abs().max())


# --------------------------------------------------------------------------------------------
# Counting bytes
# --------------------------------------------------------------------------------------------


@contextmanager
def counting_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record ``(collective, bytes)`` for each ``torch.distributed`` collective called from Python.

    The library calls them as attributes of the module (``dist.all_reduce``), so replacing the
    module's attributes sees every call; the originals come back on exit.
    """
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name: str):
        original = originals[name]

        def wrapper(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            calls.append((name, sum(t.numel() * t.element_size() for t in tensors)))
            return original(tensor, *args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def count_bytes(method: Method) -> dict:
    """One untimed step with the collectives counted; DDP's own all-reduce added as P * 4."""
    p = sum(q.numel() for q in method.net.parameters() if q.requires_grad)
    method.reset()
    with counting_collectives() as calls:
        method.step()
    python_bytes = sum(size for _, size in calls)
    ddp_bytes = 4 * p if method.ddp_allreduce else 0
    return {
        "bytes_per_step": ddp_bytes + python_bytes,
        "bytes_ddp_builtin": ddp_bytes,
        "bytes_python_collectives": python_bytes,
        "python_collectives": [list(call) for call in calls],
    }


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------


def run_rank(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
    )
    try:
        _measure(args)
        # The DDP models (and their reducers' threads) are gone once _measure returns; a rank
        # that tore down the group while its partner was still in a collective, or with DDP
        # reducers alive, was seen to abort at exit ("terminate called without an active
        # exception"), so both ranks meet here first.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure(args: argparse.Namespace) -> None:
    """Check, count and time every method on this rank; rank 0 writes the results."""
    problem = Problem(args.widths, args.batch, args.rank)
    deviations, methods = {}, []
    for cls in METHODS.values():
        deviations[cls.name] = check(cls(problem))
        # several instances (models, DDP reducers, buckets) of each method, taken in turns: one
        # instance can be up to 10% faster or slower than another of the same method for a
        # whole launch (three ddp_plain instances of one launch: 0.88-1.08 of each other)
        methods.append([cls(problem) for _ in range(args.instances)])
    counts = {instances[0].name: count_bytes(instances[0]) for instances in methods}
    cpu = torch.device("cpu")
    priming = torch.tensor(
        [
            priming_steps(min(warm_up(method, args.warmup, cpu) for method in instances))
            for instances in methods
        ]
    )
    dist.all_reduce(priming, op=dist.ReduceOp.MAX)  # both ranks run the same steps
    times = torch.zeros(len(methods), args.runs, dtype=torch.float64)
    gc.collect()
    gc.disable()
    order = random.Random(ORDER_SEED)  # the same rounds on both ranks
    try:
        for run in range(args.runs):
            # every round in a new order, against drift; each timed step right after untimed
            # ones of the same method, as in training (a fixed or rotated order put every method
            # after the same other one, and a light step after EKFAC's paid for the caches that
            # one emptied)
            for k in order.sample(range(len(methods)), len(methods)):
                method = methods[k][run % args.instances]
                prime(method, int(priming[k]))  # untimed: the timed step follows its own
                dist.barrier()  # both ranks start the step together
                start = time.perf_counter()
                method.step()
                times[k, run] = time.perf_counter() - start
            gc.collect()
    finally:
        gc.enable()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slower rank
    spreads = {
        instances[0].name: max(ranks_spread(method) for method in instances)
        for instances in methods
    }
    if args.rank == 0:
        result = {
            "threads": torch.get_num_threads(),
            "methods": {
                instances[0].name: {
                    "description": instances[0].description,
                    "times_s": times[k].tolist(),
                    "check_deviation": deviations[instances[0].name],
                    "priming_steps": int(priming[k]),
                    "ranks_max_param_difference": spreads[instances[0].name],
                    **counts[instances[0].name],
                }
                for k, instances in enumerate(methods)
            },
        }
        Path(args.child_out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# The parent: launch, collect, report
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> dict:
    """Run both ranks; fail with their output if one fails or they outlast ``--timeout``."""
    port = _free_port()
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        common = ["--batch", str(args.batch), "--runs", str(args.runs),
                  "--warmup", str(args.warmup), "--instances", str(args.instances),
                  "--widths", *map(str, args.widths)]  # fmt: skip
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.ddp", *common, "--rank", str(rank),
                 "--port", str(port), "--child-out", str(out)],  # fmt: skip
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(WORLD_SIZE)
        ]
        logs = []
        try:
            for process in processes:
                logs.append(process.communicate(timeout=args.timeout)[0])
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"a rank ran for more than {args.timeout} s: return codes "
                f"{[p.poll() for p in processes]}"
            ) from None
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for rank, (process, log) in enumerate(zip(processes, logs)):
            if process.returncode != 0:
                raise SystemExit(f"rank {rank} failed (exit {process.returncode}):\n{log}")
        return json.loads(out.read_text())


def build_records(args: argparse.Namespace, launches: list[dict]) -> list[dict]:
    """One record per method, over every launch.

    A ratio is taken inside each launch (the method's median step over ``ddp_plain``'s, both
    timed in the same rounds), and the record's ratio is the median of those: a launch can be
    lucky or unlucky as a whole (where the kernel puts the two ranks and gloo's threads, which
    buffers share cache lines), and the median over fresh launches is what does not flip from
    one ``make bench`` to the next. ``median_s`` is the median of the launches' medians.
    """
    per_launch = [
        {name: statistics.median(m["times_s"]) for name, m in ranks["methods"].items()}
        for ranks in launches
    ]
    ratios = {
        name: [medians[name] / medians["ddp_plain"] for medians in per_launch]
        for name in per_launch[0]
    }
    medians = {name: statistics.median(m[name] for m in per_launch) for name in per_launch[0]}
    ranks = launches[0]  # the counted bytes and the descriptions are the same in every launch
    records = []
    for name, measured in ranks["methods"].items():
        samples = [t for launch in launches for t in launch["methods"][name]["times_s"]]
        checks = [launch["methods"][name] for launch in launches]
        records.append(
            {
                "config": f"digits-mlp/b{args.batch}x{WORLD_SIZE}",
                "method": name,
                "description": measured["description"],
                "median_s": medians[name],
                "min_s": min(samples),
                "max_s": max(samples),
                "runs": args.runs,
                "launches": len(launches),
                "priming_steps": [c["priming_steps"] for c in checks],  # per launch
                "ratio_to_ddp_plain": statistics.median(ratios[name]),
                "launch_ratios": ratios[name],
                "target_ratio": TARGETS.get(name),
                "world_size": WORLD_SIZE,
                "backend": "gloo",
                "batch_per_rank": args.batch,
                "widths": args.widths,
                "num_params": num_params(args.widths),
                "device": "cpu",
                "torch": torch.__version__,
                "threads_per_rank": ranks["threads"],
                "check_deviation": max(c["check_deviation"] for c in checks),
                "ranks_max_param_difference": max(
                    c["ranks_max_param_difference"] for c in checks
                ),
                "bytes_per_step": measured["bytes_per_step"],
                "bytes_expected": expected_bytes(name, args.widths),
                "bytes_ddp_builtin": measured["bytes_ddp_builtin"],
                "bytes_python_collectives": measured["bytes_python_collectives"],
                "python_collectives": measured["python_collectives"],
                "times_s": samples,
            }
        )
    return records


def targets(records: list[dict]) -> list[dict]:
    """The issue's targets: each method's median step against ``ddp_plain``'s."""
    by_method = {r["method"]: r for r in records}
    return [
        {
            "method": name,
            "ratio": by_method[name]["ratio_to_ddp_plain"],
            "target": limit,
            "met": by_method[name]["ratio_to_ddp_plain"] <= limit,
        }
        for name, limit in TARGETS.items()
    ]


def diagnostics(records: list[dict]) -> dict[str, float]:
    """Ratios that say where a missed target's time goes (no targets themselves)."""
    ratios = {r["method"]: r["launch_ratios"] for r in records}
    return {
        # the noise-scale hook's own work, above what any Python communication hook costs
        "ddp_noise_scale_hook / ddp_torch_allreduce_hook": statistics.median(
            hook / bare
            for hook, bare in zip(
                ratios["ddp_noise_scale_hook"], ratios["ddp_torch_allreduce_hook"]
            )
        ),
        # the Python communication hook mechanism, against DDP's built-in C++ all-reduce
        "ddp_torch_allreduce_hook / ddp_plain": statistics.median(
            ratios["ddp_torch_allreduce_hook"]
        ),
    }


def summary(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"one DDP step, {WORLD_SIZE} gloo ranks x {meta['threads_per_rank']} thread "
        f"({meta['device_name']}), load average before {meta['load_average'][0]}, after "
        f"{meta['load_average'][1]}:",
        f"  {'method':26s} {'median ms':>10s} {'ratio':>7s} {'bytes/step':>11s}",
    ]
    for r in results["records"]:
        lines.append(
            f"  {r['method']:26s} {1e3 * r['median_s']:10.3f} {r['ratio_to_ddp_plain']:7.3f} "
            f"{r['bytes_per_step']:11d}"
        )
    wrong = [r["method"] for r in results["records"] if r["bytes_per_step"] != r["bytes_expected"]]
    if wrong:
        lines.append(f"bytes per step differ from the documented communication: {wrong}")
    lines.append("targets:")
    for t in results["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        ratio = f"{t['method']} / ddp_plain = {t['ratio']:.3f} (<= {t['target']})"
        lines.append(f"  {ratio}: {verdict}")
    for name, value in results["diagnostics"].items():
        lines.append(f"  (diagnostic, no target: {name} = {value:.3f})")
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ddp", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="31 timed steps, no quiet wait")
    parser.add_argument("--out", type=Path, default=None, help="where to write the results JSON")
    parser.add_argument("--runs", type=int, default=None, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first")
    parser.add_argument(
        "--launches", type=int, default=None,
        help=f"fresh pairs of rank processes; ratios are medians over them (default: "
        f"{FULL_LAUNCHES} for a full run, {QUICK_LAUNCHES} with --quick)",
    )
    parser.add_argument(
        "--instances", type=int, default=None,
        help=f"instances of each method per launch, timed in turns (default: {FULL_INSTANCES} "
        f"for a full run, {QUICK_INSTANCES} with --quick)",
    )
    parser.add_argument("--batch", type=int, default=64, help="examples per rank")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 256, 10])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the ranks may run")
    parser.add_argument(
        "--quiet-wait", type=float, default=None,
        help="seconds to wait for other processes to leave the CPU mostly idle first "
        "(default: 120 for a full run, 0 with --quick)",
    )
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else FULL_RUNS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else FULL_WARMUP
    if args.launches is None:
        args.launches = QUICK_LAUNCHES if args.quick else FULL_LAUNCHES
    if args.instances is None:
        args.instances = QUICK_INSTANCES if args.quick else FULL_INSTANCES
    if args.launches < 1:
        parser.error(f"--launches must be >= 1, got {args.launches}.")
    if args.instances < 1:
        parser.error(f"--instances must be >= 1, got {args.instances}.")
    if args.runs < 1 or args.warmup < 0:
        parser.error(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}.")
    widths = args.widths
    if len(widths) < 2 or widths[0] != DIGITS_PIXELS or widths[-1] != DIGITS_CLASSES:
        parser.error(
            f"--widths must start with {DIGITS_PIXELS} (digits' pixels) and end with "
            f"{DIGITS_CLASSES} (its classes), e.g. --widths 64 256 256 10; got {widths}."
        )
    if min(widths) < 1:
        parser.error(f"--widths must be positive layer widths, got {widths}.")
    largest = DIGITS_EXAMPLES // WORLD_SIZE
    if not 1 <= args.batch <= largest:
        parser.error(
            f"--batch (examples per rank) must be in [1, {largest}]: digits holds "
            f"{DIGITS_EXAMPLES} examples for {WORLD_SIZE} ranks; got {args.batch}."
        )
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}.")
    if args.out is None:
        args.out = (
            REPO / "benchmarks" / "_scratch" / "results_ddp_quick.json"
            if args.quick
            else REPO / "benchmarks" / "results_ddp.json"
        )
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 120.0
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.rank is not None:
        run_rank(args)
        return None
    waited = wait_for_quiet(0.25, args.quiet_wait) if args.quiet_wait > 0 else 0.0
    uptime_before, load_before = _uptime(), os.getloadavg()
    launches = [launch(args) for _ in range(args.launches)]
    records = build_records(args, launches)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "device": "cpu",
            "device_name": device_name(torch.device("cpu")),
            "cpu_count": os.cpu_count(),
            "threads_per_rank": launches[0]["threads"],
            "world_size": WORLD_SIZE,
            "backend": "gloo",
            "versions": _versions(),
            "quick": args.quick,
            "runs": args.runs,
            "launches": args.launches,
            "instances": args.instances,
            "warmup": args.warmup,
            "quiet_wait_s": waited,
            "learning_rate": LEARNING_RATE,
            "max_norm": MAX_NORM,
            "ekfac_update_freq": EKFAC_UPDATE_FREQ,
            "load_average": [load_before, os.getloadavg()],
            "uptime": [uptime_before, _uptime()],
            "bytes_counting": (
                "payload each rank contributes per step: numel * element_size of every "
                "torch.distributed collective called from Python (counted in one untimed step), "
                "plus P * 4 for DDP's built-in gradient all-reduce where it runs"
            ),
        },
        "records": records,
        "targets": targets(records),
        "diagnostics": diagnostics(records),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
