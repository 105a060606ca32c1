"""Statistics across data-parallel workers: two gloo processes against one process.

The test starts two ranks as subprocesses on 127.0.0.1 (a free port, a timeout on the process
group and on the parent's wait, so a hanging or failing rank fails the test instead of hanging
CI). Each rank holds an unequal share of one batch; every statistic with ``group=WORLD`` must
give, on every rank, the single-process result on the concatenated batch.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import goodfellow as gf
from tests.conftest import TOLERANCES

WORLD_SIZE = 2
N = 8
TIMEOUT_S = 240
ROOT = Path(__file__).parent.parent
F64 = TOLERANCES[torch.float64]

# rank -> its examples of the batch of N; "empty" gives rank 1 no example at all
SPLITS = {
    "unequal": {0: slice(0, 5), 1: slice(5, 8)},
    "empty": {0: slice(0, 8), 1: slice(8, 8)},
}


# --------------------------------------------------------------------------------------------
# Sources of per-example gradients for a slice of one fixed batch
# --------------------------------------------------------------------------------------------


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def materialized_list(part: slice) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    full = [
        torch.randn(N, 3, 4, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(N, 3, generator=g, dtype=torch.float64),
    ]
    return [t[part] for t in full]


def materialized_dict(part: slice) -> dict[str, torch.Tensor]:
    return dict(zip(["fc.weight", "fc.bias"], materialized_list(part)))


def mlp_source(part: slice) -> list:
    torch.manual_seed(3)
    model = gf.MLP(4, [5], output_size=3).double()
    x, y = _batch()
    prediction, activations, linear_combs = model(x[part])
    loss = F.cross_entropy(prediction, y[part], reduction="sum")
    linear_grads = torch.autograd.grad(loss, linear_combs)
    return gf.mlp_factors(activations, linear_grads, loss_reduction="sum")


def recorded_source(part: slice) -> dict:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _batch()
    with gf.PerExampleGradients(model, loss_reduction="mean") as pe:
        F.cross_entropy(model(x[part]), y[part]).backward()
    return gf.recorded_factors(pe)


def sequence_source(part: slice) -> dict:
    # Linear layers at 8 positions of widths 2 and 3: their norms are formed per example (the
    # Gram count is over 4x larger), so the clipped mean takes the one-pass formed sums
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, 8, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (N, 8), generator=g)
    with gf.PerExampleGradients(model, loss_reduction="sum") as pe:
        logits = model(x[part])  # (n, 8, 2)
        F.cross_entropy(logits.flatten(0, 1), y[part].flatten(), reduction="sum").backward()
    return gf.recorded_factors(pe)


def conv_source(part: slice) -> dict:
    # a grouped convolution with circular padding: its rule's sums and norms, not a Linear's
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular", groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 6, 3),
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(8)
    x = torch.randn(N, 2, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    with gf.PerExampleGradients(model, loss_reduction="mean") as pe:
        F.cross_entropy(model(x[part]), y[part]).backward()
    return gf.recorded_factors(pe)


class TinyTransformer(nn.Module):
    """An embedding with padding, a LayerNorm, attention and a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(5, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (n, T) -> (n, T, 5)
        x = self.norm(self.tokens(t))
        return self.head(x + self.attention(x, x, x, need_weights=False)[0])


def transformer_source(part: slice) -> dict:
    torch.manual_seed(9)
    model = TinyTransformer().double()
    g = torch.Generator().manual_seed(10)
    t = torch.randint(0, 5, (N, 6), generator=g)
    with gf.PerExampleGradients(model, loss_reduction="sum") as pe:
        logits = model(t[part])  # (n, 6, 5): next-token logits of a sequence of 6
        F.cross_entropy(logits.flatten(0, 1), t[part].flatten(), reduction="sum").backward()
    return gf.recorded_factors(pe)


SOURCES: dict[str, Callable[[slice], object]] = {
    "list": materialized_list,
    "dict": materialized_dict,
    "mlp_factors": mlp_source,
    "recorded_factors": recorded_source,
    "sequence_factors": sequence_source,
    "conv_factors": conv_source,
    "transformer_factors": transformer_source,
}

STATISTICS: dict[str, Callable[..., object]] = {
    "gradient_mean": lambda s, group: gf.gradient_mean(s, group=group),
    "clipped_mean": lambda s, group: gf.clipped_mean(s, 1.5, group=group),
    "gradient_second_moment": lambda s, group: gf.gradient_second_moment(s, group=group),
    "gradient_variance": lambda s, group: gf.gradient_variance(s, group=group),
    "gradient_variance unbiased": lambda s, group: gf.gradient_variance(s, True, group=group),
    "gradient_variance_trace": lambda s, group: gf.gradient_variance_trace(s, group=group),
    "gradient_variance_trace unbiased": (
        lambda s, group: gf.gradient_variance_trace(s, True, group=group)
    ),
    "noise_scale_parts": lambda s, group: gf.noise_scale_parts(s, group=group),
    "noise_scale_parts plug-in": lambda s, group: gf.noise_scale_parts(s, False, group=group),
    "gradient_noise_scale": lambda s, group: gf.gradient_noise_scale(s, group=group),
    "gradient_noise_scale plug-in": (
        lambda s, group: gf.gradient_noise_scale(s, False, group=group)
    ),
}


def as_list(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return list(result)


def _run_or_error(function: Callable[..., object], *args: object) -> object:
    """The result as a list of tensors, or the exception's text (compared by the parent)."""
    try:
        return [t.detach().clone() for t in as_list(function(*args))]
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the test
        return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# The ranks
# --------------------------------------------------------------------------------------------


def _init(rank: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )


def _statistics_worker(rank: int) -> dict:
    import torch.distributed as dist

    results = {}
    for split, parts in SPLITS.items():
        for source_name, build in SOURCES.items():
            try:
                build(parts[rank])
                error = None
            except Exception as raised:  # noqa: BLE001 - reported to the parent
                error = f"{type(raised).__name__}: {raised}"
            # all ranks skip a source some rank cannot build: a lone rank would wait forever
            failed = torch.tensor([float(isinstance(error, str))])
            dist.all_reduce(failed)
            if failed.item():
                results[split, source_name] = error if isinstance(error, str) else "other rank"
                continue
            source = build(parts[rank])
            for name, statistic in STATISTICS.items():
                results[split, source_name, name] = _run_or_error(
                    statistic, source, dist.group.WORLD
                )
    return results


def _worker(kind: str, rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    _init(rank, port)
    try:
        if kind == "statistics":
            results = _statistics_worker(rank)
        elif kind == "cabs":
            results = _cabs_run(rank, dist.group.WORLD)
        elif kind in ("ekfac", "kfac"):
            results = _ekfac_run(kind, rank, dist.group.WORLD)
        elif kind == "dpsgd":
            results = _ddp_dpsgd_run(rank)
        else:
            results = _hook_worker(rank, kind)
        torch.save(results, out)
        # both ranks done with every collective before the group goes: gloo can abort at exit
        # when one rank tears down while the other still holds DDP state
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(kind: str, tmp_path: Path) -> list[dict]:
    """Run ``_worker(kind, ...)`` on two ranks; fail on a crash or after ``TIMEOUT_S``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"{kind}{rank}.pt" for rank in range(WORLD_SIZE)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_distributed", kind, str(rank), str(port), str(out)],
            cwd=ROOT,
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
            logs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank hung for {TIMEOUT_S} s: return codes {[p.poll() for p in processes]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(out) for out in outs]


# --------------------------------------------------------------------------------------------
# Every statistic, every source, unequal and empty shares
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def statistics_per_rank(tmp_path_factory) -> list[dict]:
    return _launch("statistics", tmp_path_factory.mktemp("statistics"))


CASES = [
    pytest.param(
        split,
        source,
        name,
    )
    for split in SPLITS
    for source in SOURCES
    for name in STATISTICS
]


@pytest.mark.parametrize(("split", "source_name", "name"), CASES)
def test_every_rank_gets_the_single_process_result(statistics_per_rank, split, source_name, name):
    whole = SOURCES[source_name](slice(0, N))
    expected = [t.detach() for t in as_list(STATISTICS[name](whole, None))]
    errors = [results.get((split, source_name)) for results in statistics_per_rank]
    assert errors == [None] * WORLD_SIZE, f"{source_name} sources could not be built: {errors}"
    for rank, results in enumerate(statistics_per_rank):
        actual = results[split, source_name, name]
        assert not isinstance(actual, str), f"rank {rank} raised {actual}"
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, **F64)


def test_the_single_process_reference_is_not_one_share_alone():
    """Guards the test above: the shares' own statistics differ from the whole batch's."""
    whole = gf.gradient_variance(materialized_list(slice(0, N)))
    share = gf.gradient_variance(materialized_list(SPLITS["unequal"][0]))
    assert not torch.allclose(whole[0], share[0])


# --------------------------------------------------------------------------------------------
# The noise scale from DDP's all-reduce (goodfellow.distributed.NoiseScaleHook)
# --------------------------------------------------------------------------------------------

HOOK_SHARES = {"hook equal": (4, 4), "hook unequal": (5, 3), "hook float32": (4, 4),
               "hook float16": (5, 3), "hook read at the end": (5, 3),
               "hook float16 read at the end": (4, 4),
               "hook accumulated": (5, 3), "hook bucket views": (5, 3),
               "hook one bucket": (5, 3)}  # fmt: skip
HOOK_DTYPES = {"hook float32": torch.float32, "hook float16": torch.float16,
               "hook float16 read at the end": torch.float16}  # fmt: skip
# results read only after the last step: the steps in between are settled by the next backward
# accumulated: each step's share in two micro-batches, the first under no_sync() (not counted)
# bucket views: DDP(gradient_as_bucket_view=True), .grad a view of DDP's own bucket
# one bucket: DDP's default cap, the whole gradient in the bucket that carries the two numbers
HOOK_READ_AT_THE_END = {"hook read at the end", "hook float16 read at the end"}
# float32 buckets carry the two scalars in float32; float16 ones send them apart, in float64,
# but the gradient itself is rounded to float16
HOOK_TOLERANCES = {torch.float64: F64, torch.float32: {"rtol": 1e-5, "atol": 1e-9},
                   torch.float16: {"rtol": 2e-2, "atol": 1e-4}}  # fmt: skip
HOOK_STEPS = 4
DECAY = 0.5


def _hook_worker(rank: int, kind: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from goodfellow.distributed import NoiseScaleHook

    sizes = HOOK_SHARES[kind]
    dtype = HOOK_DTYPES.get(kind, torch.float64)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    # a tiny bucket cap puts each parameter in a bucket of its own: several hook calls a step
    model = DistributedDataParallel(
        net, bucket_cap_mb=25 if kind == "hook one bucket" else 1e-5,
        gradient_as_bucket_view=kind == "hook bucket views",
    )
    hook = NoiseScaleHook(model, batch_size=sizes[rank], decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = {"local": [], "averaged": [], "last_parts": [], "parts": [], "noise_scale": []}
    for step in range(HOOK_STEPS):
        g = torch.Generator().manual_seed(10 + step)
        x = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 3, (sum(sizes),), generator=g)
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        # the rank's own mean gradient, computed without DDP: the reference's input
        local = torch.autograd.grad(F.cross_entropy(net(x[mine]), y[mine]), net.parameters())
        optimizer.zero_grad()
        if kind == "hook accumulated":  # losses weighted so that the sum is the share's mean
            xs, ys, first = x[mine], y[mine], (sizes[rank] + 1) // 2
            with model.no_sync():
                (F.cross_entropy(model(xs[:first]), ys[:first]) * first / len(xs)).backward()
            rest = len(xs) - first
            (F.cross_entropy(model(xs[first:]), ys[first:]) * rest / len(xs)).backward()
        else:
            F.cross_entropy(model(x[mine]), y[mine]).backward()
        record["local"].append([t.detach().clone() for t in local])
        record["averaged"].append([p.grad.detach().clone() for p in net.parameters()])
        read = kind not in HOOK_READ_AT_THE_END or step == HOOK_STEPS - 1
        record["last_parts"].append(hook.last_parts if read else None)
        record["parts"].append(hook.parts if read else None)
        record["noise_scale"].append(hook.noise_scale if read else None)
        optimizer.step()
    record["steps"] = hook.steps
    record["errors"] = _bad_hook_arguments(rank)
    return record


BAD_HOOK_ARGUMENTS = {
    "decay 1": ({"decay": 1.0}, ValueError, r"decay must be a number in \[0, 1\)"),
    "decay negative": ({"decay": -0.1}, ValueError, "decay must be"),
    "batch size 0": ({"batch_size": 0}, ValueError, "batch_size must be this rank's number"),
    "batch size float": ({"batch_size": 2.0}, ValueError, "an int >= 1"),
    "one rank": ({"batch_size": 2, "group": "rank 0 only"}, ValueError, "at least 2 ranks"),
}


def _bad_hook_arguments(rank: int) -> dict:
    """Each bad argument's (exception type, message) on this rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from goodfellow.distributed import NoiseScaleHook

    alone = dist.new_group([0])  # every rank takes part in creating it
    errors = {}
    for name, (kwargs, _, _) in BAD_HOOK_ARGUMENTS.items():
        kwargs = dict(kwargs)
        group = kwargs.pop("group", None)
        if group is not None and rank != 0:
            continue
        model = DistributedDataParallel(nn.Linear(2, 1), process_group=alone if group else None)
        try:
            NoiseScaleHook(model, **kwargs)
            errors[name] = None
        except Exception as error:  # noqa: BLE001 - compared by the parent
            errors[name] = (type(error).__name__, str(error))
    return errors


def _squared_norm(tensors: list[torch.Tensor]) -> float:
    return float(sum(t.double().square().sum() for t in tensors))


@pytest.mark.parametrize("kind", HOOK_SHARES)
def test_the_noise_scale_hook_follows_its_formula(kind, tmp_path):
    per_rank = _launch(kind, tmp_path)
    sizes = HOOK_SHARES[kind]
    tolerance = HOOK_TOLERANCES[HOOK_DTYPES.get(kind, torch.float64)]
    w = WORLD_SIZE
    averages = torch.zeros(2, dtype=torch.float64)
    for step in range(HOOK_STEPS):
        local = [results["local"][step] for results in per_rank]
        mean = [sum(t.double() for t in ts) / w for ts in zip(*local)]  # DDP's average
        for results in per_rank:  # the hook leaves DDP's gradient as it is
            for a, e in zip(results["averaged"][step], mean):
                torch.testing.assert_close(a.double(), e, **tolerance)
        small = [_squared_norm(ts) for ts in local]
        big = _squared_norm(mean)
        if sizes[0] == sizes[1]:  # McCandlish et al., appendix A, as printed
            b, batch = sizes[0], sum(sizes)
            small_mean = sum(small) / w
            squared_norm = (batch * big - b * small_mean) / (batch - b)
            trace = (small_mean - big) / (1 / b - 1 / batch)
        else:  # the two expectations E sum |g_r|^2 and E |g_bar|^2 solved for S and |G|^2
            h = sum(1 / b for b in sizes)
            matrix = torch.tensor([[w, h], [1.0, h / w**2]], dtype=torch.float64)
            rhs = torch.tensor([sum(small), big], dtype=torch.float64)
            squared_norm, trace = torch.linalg.solve(matrix, rhs).tolist()
        parts = torch.tensor([trace, squared_norm], dtype=torch.float64)
        averages = DECAY * averages + (1 - DECAY) * parts
        debiased = averages / (1 - DECAY ** (step + 1))
        for results in per_rank:
            if results["last_parts"][step] is None:  # not read at this step
                continue
            last = torch.tensor(results["last_parts"][step], dtype=torch.float64)
            torch.testing.assert_close(last, parts, **tolerance)
            smoothed = torch.tensor(results["parts"][step], dtype=torch.float64)
            torch.testing.assert_close(smoothed, debiased, **tolerance)
            expected = float(debiased[0] / debiased[1])
            relative = 1e-10 if tolerance is F64 else 10 * tolerance["rtol"]
            assert results["noise_scale"][step] == pytest.approx(expected, rel=relative)
    assert [results["steps"] for results in per_rank] == [HOOK_STEPS] * w
    if kind == "hook equal":  # bad arguments, checked once
        for name, (_, error, match) in BAD_HOOK_ARGUMENTS.items():
            raised = per_rank[0]["errors"][name]
            assert raised is not None and raised[0] == error.__name__, f"{name}: {raised}"
            assert re.search(match, raised[1]), f"{name}: {raised[1]}"


def test_the_noise_scale_hook_needs_a_ddp_model():
    from goodfellow.distributed import NoiseScaleHook

    with pytest.raises(TypeError, match="needs a torch.nn.parallel.DistributedDataParallel"):
        NoiseScaleHook(nn.Linear(2, 1), batch_size=4)


# --------------------------------------------------------------------------------------------
# AdaptiveBatchSampler's shares (no process group needed: every rank's sampler is local)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[4, 4, 4], [5, 2, 7, 1, 9], [13, 3]])
def test_the_ranks_shares_are_disjoint_and_make_the_global_batch(num_replicas, sizes):
    def draw(**replicas) -> list[list[int]]:
        asked = iter(sizes * 10)  # the same global sizes on every rank, read once per batch
        generator = torch.Generator().manual_seed(7)  # seeded alike on every rank
        sampler = gf.AdaptiveBatchSampler(
            13, lambda: next(asked), epochs=2, generator=generator, **replicas
        )
        return list(sampler)

    whole = draw()
    shares = [draw(num_replicas=num_replicas, rank=rank) for rank in range(num_replicas)]
    assert all(len(share) == len(whole) for share in shares)
    for k, batch in enumerate(whole):
        parts = [share[k] for share in shares]
        together = [i for part in parts for i in part]
        assert sorted(together) == sorted(batch)  # complete
        assert len(set(together)) == len(together)  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


BAD_SAMPLER_ARGUMENTS = [
    ({"num_replicas": 2}, "num_replicas and rank go together"),
    ({"rank": 0}, "num_replicas and rank go together"),
    ({"num_replicas": 0, "rank": 0}, "num_replicas must be a positive integer"),
    ({"num_replicas": 2, "rank": 2}, r"rank must be an integer in \[0, num_replicas = 2\)"),
    ({"num_replicas": 2, "rank": -1}, "rank must be an integer"),
    ({"num_replicas": 2, "rank": 1, "generator": None}, "pass a generator seeded alike"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_SAMPLER_ARGUMENTS)
def test_bad_replica_arguments_are_refused(kwargs, match):
    kwargs = {"generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        gf.AdaptiveBatchSampler(10, 4, **kwargs)


def _cabs_run(rank: int | None, group: object = None) -> dict:
    """A few CABS steps on batches drawn by AdaptiveBatchSampler; ``rank=None``: one process."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    cabs = gf.CABS(model.named_parameters(), lr=2.0, bounds=(3, 20), decay=0.5, group=group)
    replicas = {} if rank is None else {"num_replicas": WORLD_SIZE, "rank": rank}
    sampler = gf.AdaptiveBatchSampler(
        40, cabs, generator=torch.Generator().manual_seed(9), **replicas
    )
    sizes = []
    for _, indices in zip(range(5), sampler):
        with gf.PerExampleGradients(model) as pe:
            losses = F.cross_entropy(model(x[indices]), y[indices], reduction="none")  # (b_r,)
            losses.sum().backward()
        sizes.append(cabs.step(losses, gf.recorded_factors(pe)))
    return {"sizes": sizes, "params": [p.detach().clone() for p in model.parameters()]}


def test_cabs_on_two_ranks_follows_the_single_process_trajectory(tmp_path):
    expected = _cabs_run(None)
    assert len(set(expected["sizes"])) > 1  # the batch size does adapt in this run
    for results in _launch("cabs", tmp_path):
        assert results["sizes"] == expected["sizes"]
        for a, e in zip(results["params"], expected["params"]):
            torch.testing.assert_close(a, e, **F64)


def _ekfac_run(mode: str, rank: int | None, group: object = None) -> dict:
    """A few EKFAC/KFAC steps; on two ranks each holds half of every batch, under DDP."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    trained = model
    if rank is not None:
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = gf.EKFAC(trained, lr=0.3, damping=1e-2, update_freq=2, decay=0.5, mode=mode,
                         group=group)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        part = slice(None) if rank is None else slice(4 * rank, 4 * rank + 4)
        optimizer.zero_grad()
        F.cross_entropy(trained(x[part]), y[part]).backward()  # mean: DDP averages the ranks
        optimizer.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("mode", ["ekfac", "kfac"])
def test_ekfac_on_two_ranks_follows_the_single_process_trajectory(mode, tmp_path):
    """Factors averaged over the ranks: the same preconditioner and steps as one process."""
    expected = _ekfac_run(mode, None)
    for results in _launch(mode, tmp_path):
        for a, e in zip(results["params"], expected["params"]):
            torch.testing.assert_close(a, e, **F64)


def _ddp_dpsgd_run(rank: int | None) -> dict:
    """DP-SGD steps (no noise) under DDP: norms recorded on each rank's share, the clipped mean
    of the global batch from one all-reduce of the factored clipped sums."""
    import torch.distributed as dist

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    trained = model if rank is None else nn.parallel.DistributedDataParallel(model)
    group = None if rank is None else dist.group.WORLD
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        x = torch.randn(9, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (9,), generator=g)
        part = slice(None) if rank is None else [slice(0, 5), slice(5, 9)][rank]  # unequal
        with gf.PerExampleGradients(trained, loss_reduction="sum") as pe:
            if rank is None:
                F.cross_entropy(trained(x[part]), y[part], reduction="sum").backward()
            else:
                with trained.no_sync():  # the per-example route needs no gradient all-reduce
                    F.cross_entropy(trained(x[part]), y[part], reduction="sum").backward()
        mean = gf.clipped_mean(gf.recorded_factors(pe), 0.5, group=group)
        with torch.no_grad():
            for p, key in zip(model.parameters(), mean):
                p -= 0.5 * mean[key]
    return {"params": [p.detach().clone() for p in model.parameters()]}


def test_a_ddp_dpsgd_step_equals_the_single_process_clipped_mean(tmp_path):
    expected = _ddp_dpsgd_run(None)
    for results in _launch("dpsgd", tmp_path):
        for a, e in zip(results["params"], expected["params"]):
            torch.testing.assert_close(a, e, **F64)


# --------------------------------------------------------------------------------------------
# The example, as torchrun runs it
# --------------------------------------------------------------------------------------------


def test_the_ddp_example_trains_and_keeps_the_ranks_in_step():
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--standalone", "--nproc-per-node", str(WORLD_SIZE),
        "examples/ddp_training.py", "--steps", "40", "--log-every", "20",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example ran for more than {TIMEOUT_S} s")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    initial = float(re.search(r"initial loss ([0-9.]+)", output).group(1))
    final = float(re.search(r"final loss ([0-9.]+)", output).group(1))
    assert final < 0.8 * initial, output
    scales = re.findall(r"noise scale: hook +(\S+), per-example +(\S+)", output)
    assert len(scales) == 2, output  # steps 20 and 40
    assert all(float(hook) == float(hook) for hook, _ in scales)  # not nan: the hook ran
    assert "ranks agree: True" in output, output
    assert "steps:" in output  # rank 0's progress bar


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_the_hooks_average_is_ddps_quotient_bit_for_bit(world_size, dtype):
    # a power of two multiplies by its exact reciprocal; any other world size divides
    from goodfellow.distributed import _average

    g = torch.Generator().manual_seed(world_size)
    bucket = (torch.randn(1000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -30, 30, (1000,), generator=g)).to(dtype)  # fmt: skip
    out = torch.empty_like(bucket)
    _average(bucket, world_size, out=out)
    assert torch.equal(out, bucket / world_size)
    in_place = bucket.clone()
    _average(in_place, world_size, out=in_place)
    assert torch.equal(in_place, bucket / world_size)
