"""Figures, tables and the verdict on the speed targets, made from a results JSON.

Everything here reads ``results.json`` only, so the docs build never runs a benchmark: ``python -m
benchmarks.run --report-only`` redraws the artefacts from committed results. Files written to the
figures folder (``docs/_static/benchmarks`` for a full run), ``<device>`` being ``cpu`` or
``cuda``:

* ``<device>_<allocator>.png``: time of every method relative to ``plain_backward``, one panel per
  configuration;
* ``<device>_results.csv``: median times, ratios and page faults per step under both allocator
  settings, peak memory;
* ``<device>_targets.csv``: each speed and memory target of the issue, met or not, with the
  worst measured value.
"""

from __future__ import annotations

import csv
import random
import statistics
from collections.abc import Callable
from pathlib import Path

from benchmarks.methods import CONV_CONFIGS, LARGEST, LM_CONFIGS, METHODS

PEERS = ("naive_loop", "torch_func_vmap", "opacus", "backpack")
MATERIALIZING = ("goodfellow_backprop", "hooks")
COLORS = {
    "plain_backward": "#4d4d4d",
    "write_floor": "#a6a6a6",
    "naive_loop": "#c9a27e",
    "torch_func_vmap": "#b07aa1",
    "opacus": "#e39c9c",
    "backpack": "#9cb7d6",
    "goodfellow_backprop": "#1b7837",
    "goodfellow_backprop_fresh": "#8fcf8f",
    "hooks": "#2166ac",
    "norms_only": "#e08214",
    "clipped_mean": "#b35806",
    "ghost_clipped_mean": "#7f3b08",
    "opacus_ghost_clipping": "#d6604d",
}


def _index(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["allocator"], r["config"], r["method"]): r for r in records}


def _configs(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["config"] for r in records))


def _allocators(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["allocator"] for r in records))


def _methods(records: list[dict]) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def evaluate_targets(results: dict) -> list[dict]:
    """Every target of the issue, per method and allocator setting, over all configurations.

    Returns:
        Rows ``{"target", "method", "allocator", "met", "checked", "worst", "worst_config",
        "required", "interval", "decided"}``: ``met`` of ``checked`` configurations pass;
        ``worst`` is the least favourable measured value, formatted; ``interval`` the 90%
        interval of that configuration's value over resampled rounds (:func:`round_medians`),
        formatted, and ``decided`` whether the verdict holds over those intervals (a met
        target: every configuration's interval passes; a missed one: some configuration's
        interval fails from end to end), so that this run's own spread cannot turn it (both
        ``None`` for a memory target, or for records without their timed steps).
    """
    records = results["records"]
    index = _index(records)
    resampled = round_medians(records)
    rows = []

    def median(allocator: str, config: str, method: str) -> float | None:
        record = index.get((allocator, config, method))
        return None if record is None else record["median_s"]

    def draws(value: Callable, config: str) -> list[float] | None:
        """``value`` of ``config`` once per resampling of its rounds (None: no timed steps)."""
        out = []
        for draw in range(RESAMPLES):

            def drawn(allocator: str, config: str, method: str, draw: int = draw):
                medians = resampled.get((allocator, config, method))
                return None if medians is None else medians[draw]

            result = value(config, drawn)
            if result is None:
                return None
            out.append(result)
        return sorted(out)

    def add(
        target: str,
        method: str,
        allocator: str,
        configs: list[str],
        value: Callable[[str, Callable], float | None],
        passes: Callable[[float], bool],
        required: str,
        fmt: str,
        larger_is_worse: bool = True,
        timed: bool = True,
    ) -> None:
        values = {c: value(c, median) for c in configs}
        values = {c: v for c, v in values.items() if v is not None}
        if not values:
            return
        pick = max if larger_is_worse else min
        worst_config = pick(values, key=values.get)
        spreads = {c: draws(value, c) if timed else None for c in values}
        bounds = {
            c: (d[int(0.05 * RESAMPLES)], d[int(0.95 * RESAMPLES) - 1])
            for c, d in spreads.items() if d is not None
        }  # fmt: skip
        # A threshold: whether a value passes flips once at most inside an interval.
        settled = {c: passes(lo) if passes(lo) == passes(hi) else None
                   for c, (lo, hi) in bounds.items()}  # fmt: skip
        met = sum(passes(v) for v in values.values())
        if len(bounds) < len(values):
            decided = None
        elif met == len(values):  # met stays met only if no interval reaches the line
            decided = all(settled.values())
        else:  # a miss stays a miss if one configuration fails all over its interval
            decided = any(s is False for s in settled.values())
        low, high = bounds.get(worst_config, (None, None))
        rows.append(
            {
                "target": target,
                "method": method,
                "allocator": allocator,
                "met": met,
                "checked": len(values),
                "worst": fmt.format(values[worst_config]),
                "worst_config": worst_config,
                "required": required,
                "interval": None if low is None else f"{fmt.format(low)}-{fmt.format(high)}",
                "decided": decided,
            }
        )

    conv_labels = {c.label for c in CONV_CONFIGS}
    lm_labels = {c.label for c in LM_CONFIGS}
    for allocator in _allocators(records):
        every = [c for c in _configs(records) if (allocator, c, "plain_backward") in index]
        # The conv (issue 12) and language-model (issue 13) configurations have targets of
        # their own, below.
        configs = [c for c in every if c not in conv_labels | lm_labels]
        convs = [c for c in every if c in conv_labels]
        lms = [c for c in every if c in lm_labels]

        def ratio_to(method: str, floor: tuple[str, ...], allocator: str = allocator):
            def ratio(config: str, median: Callable) -> float | None:
                parts = [median(allocator, config, m) for m in floor]
                own = median(allocator, config, method)
                if own is None or any(p is None for p in parts):
                    return None
                return own / sum(parts)

            return ratio

        def peer_speedup(method: str, allocator: str = allocator):
            def speedup(config: str, median: Callable) -> float | None:
                own = median(allocator, config, method)
                peers = [median(allocator, config, m) for m in PEERS]
                peers = [p for p in peers if p is not None]
                if own is None or not peers:
                    return None
                return min(peers) / own

            return speedup

        for method in MATERIALIZING:
            add(
                "materialized within 1.5x of plain_backward + write_floor", method, allocator,
                configs, ratio_to(method, ("plain_backward", "write_floor")),
                lambda v: v <= 1.5, "<= 1.5x", "{:.2f}x",
            )
        for method in MATERIALIZING:
            if allocator == "default":
                add(
                    "2x faster than the fastest peer (two largest configurations)", method,
                    allocator, [c for c in configs if c in LARGEST], peer_speedup(method),
                    lambda v: v >= 2.0, ">= 2x", "{:.2f}x", larger_is_worse=False,
                )
            add(
                "faster than every peer", method, allocator, configs, peer_speedup(method),
                lambda v: v > 1.0, "> 1x", "{:.2f}x", larger_is_worse=False,
            )
        add(
            "norms_only at most 1.0x plain_backward", "norms_only", allocator, configs,
            ratio_to("norms_only", ("plain_backward",)), lambda v: v <= 1.0, "<= 1.0x",
            "{:.2f}x",
        )
        add(
            "clipped_mean at most 2.2x plain_backward", "clipped_mean", allocator, configs,
            ratio_to("clipped_mean", ("plain_backward",)), lambda v: v <= 2.2, "<= 2.2x",
            "{:.2f}x",
        )
        add(
            "clipped_mean faster than Opacus ghost clipping", "clipped_mean", allocator, configs,
            peer_speedup_of("clipped_mean", "opacus_ghost_clipping", allocator),
            lambda v: v > 1.0, "> 1x", "{:.2f}x", larger_is_worse=False,
        )
        for method in ("norms_only", "clipped_mean"):

            def memory_share(
                config: str, median: Callable, method: str = method, allocator: str = allocator
            ):
                record = index.get((allocator, config, method))
                if record is None or record.get("peak_mem_mb") is None:
                    return None
                return record["peak_mem_mb"] / record["per_example_mb"]

            add(
                "peak extra memory O(n), not O(nP): below 10% of the n*P gradients", method,
                allocator, configs, memory_share, lambda v: v < 0.1, "< 10%", "{:.1%}",
                timed=False,
            )
        add(
            "conv: hooks within 1.6x of plain_backward + write_floor", "hooks", allocator,
            convs, ratio_to("hooks", ("plain_backward", "write_floor")), lambda v: v <= 1.6,
            "<= 1.6x", "{:.2f}x",
        )
        add(
            "conv: hooks 1.3x faster than the fastest peer", "hooks", allocator, convs,
            peer_speedup("hooks"), lambda v: v >= 1.3, ">= 1.3x", "{:.2f}x",
            larger_is_worse=False,
        )
        add(
            "conv: norms_only at most 1.2x plain_backward", "norms_only", allocator, convs,
            ratio_to("norms_only", ("plain_backward",)), lambda v: v <= 1.2, "<= 1.2x",
            "{:.2f}x",
        )
        add(
            "conv: clipped_mean at most 1.5x plain_backward", "clipped_mean", allocator, convs,
            ratio_to("clipped_mean", ("plain_backward",)), lambda v: v <= 1.5, "<= 1.5x",
            "{:.2f}x",
        )
        add(
            "conv: clipped_mean faster than Opacus ghost clipping", "clipped_mean", allocator,
            convs, peer_speedup_of("clipped_mean", "opacus_ghost_clipping", allocator),
            lambda v: v > 1.0, "> 1x", "{:.2f}x", larger_is_worse=False,
        )
        add(
            "lm: hooks within 1.2x of plain_backward + write_floor", "hooks", allocator, lms,
            ratio_to("hooks", ("plain_backward", "write_floor")), lambda v: v <= 1.2,
            "<= 1.2x", "{:.2f}x",
        )
        add(
            "lm: hooks faster than every peer", "hooks", allocator, lms, peer_speedup("hooks"),
            lambda v: v > 1.0, "> 1x", "{:.2f}x", larger_is_worse=False,
        )
        add(
            "lm: norms_only at most 1.1x plain_backward", "norms_only", allocator, lms,
            ratio_to("norms_only", ("plain_backward",)), lambda v: v <= 1.1, "<= 1.1x",
            "{:.2f}x",
        )
        add(
            "lm: clipped_mean at most 1.3x plain_backward", "clipped_mean", allocator, lms,
            ratio_to("clipped_mean", ("plain_backward",)), lambda v: v <= 1.3, "<= 1.3x",
            "{:.2f}x",
        )
        add(
            "lm: clipped_mean faster than Opacus ghost clipping", "clipped_mean", allocator,
            lms, peer_speedup_of("clipped_mean", "opacus_ghost_clipping", allocator),
            lambda v: v > 1.0, "> 1x", "{:.2f}x", larger_is_worse=False,
        )
        for method in ("norms_only", "clipped_mean"):

            def lm_memory_share(
                config: str, median: Callable, method: str = method, allocator: str = allocator
            ):
                # A transformer's plain step already holds more than n * P (activations of
                # n * T positions and the (n, h, T, T) attention weights), so what is judged is
                # the memory above plain_backward's peak.
                record = index.get((allocator, config, method))
                plain = index.get((allocator, config, "plain_backward"))
                if record is None or plain is None:
                    return None
                if record.get("peak_mem_mb") is None or plain.get("peak_mem_mb") is None:
                    return None
                extra = max(record["peak_mem_mb"] - plain["peak_mem_mb"], 0.0)
                return extra / record["per_example_mb"]

            add(
                "lm: peak memory above plain_backward's O(n), not O(nP): below 10% of n*P",
                method, allocator, lms, lm_memory_share, lambda v: v < 0.1, "< 10%", "{:.1%}",
                timed=False,
            )
    return rows


def peer_speedup_of(method: str, peer: str, allocator: str) -> Callable:
    """How many times faster ``method`` is than ``peer`` on a configuration."""

    def speedup(config: str, median: Callable) -> float | None:
        own, other = median(allocator, config, method), median(allocator, config, peer)
        if own is None or other is None:
            return None
        return other / own

    return speedup


RESAMPLES = 1000
"""Resamplings of the rounds behind each target's interval."""


def round_medians(records: list[dict], seed: int = 0) -> dict[tuple[str, str, str], list[float]]:
    """Each method's median step time under :data:`RESAMPLES` resamplings of its rounds.

    A run times every method of a configuration once per round, in a random order
    (``benchmarks/run.py``), so a round is the unit that a change in the machine's load hits
    alike. The resampling draws rounds with replacement, the same draws for every method of a
    configuration and allocator setting, so a ratio of two medians keeps the steps timed side
    by side together; the spread of a ratio over the draws is then how much this run's own
    round-to-round variation moves it. It says nothing of the spread between runs, which on
    the machines of ``benchmarks/README.md`` is larger.

    Returns:
        ``(allocator, config, method) -> RESAMPLES medians`` for every record with its timed
        steps (``times_s``); records without are left out.
    """
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("times_s"):
            groups.setdefault((record["allocator"], record["config"]), []).append(record)
    out = {}
    for (allocator, config), members in groups.items():
        rounds = min(len(r["times_s"]) for r in members)
        picks = [[rng.randrange(rounds) for _ in range(rounds)] for _ in range(RESAMPLES)]
        for record in members:
            times = record["times_s"]
            out[(allocator, config, record["method"])] = [
                statistics.median(times[j] for j in pick) for pick in picks
            ]
    return out


def targets_text(results: dict) -> str:
    """The verdict as plain text, for the end of a run."""
    lines = [
        "targets (met / checked, worst value at worst configuration, its 90% interval over"
        " resampled rounds; '?' where some configuration's interval crosses the line):"
    ]
    for row in evaluate_targets(results):
        verdict = "MET " if row["met"] == row["checked"] else "MISS"
        spread = "" if row["interval"] is None else f" [{row['interval']}]"
        unsure = "?" if row["decided"] is False else " "
        lines.append(
            f"  {verdict}{unsure}[{row['allocator']:7s}] {row['method']:20s} {row['target']}: "
            f"{row['met']}/{row['checked']}, worst {row['worst']}{spread} "
            f"({row['worst_config']}), required {row['required']}"
        )
    return "\n".join(lines)


def write_results_csv(results: dict, path: Path) -> Path:
    records = results["records"]
    index = _index(records)
    allocators = _allocators(records)
    header = ["Configuration", "Method"]
    for allocator in allocators:
        header += [f"{allocator}: median ms", f"{allocator}: x plain", f"{allocator}: faults"]
    header += ["peak extra MB"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for config in _configs(records):
            for method in _methods(records):
                row = [config, method]
                peak = None
                for allocator in allocators:
                    record = index.get((allocator, config, method))
                    if record is None:
                        row += ["", "", ""]
                        continue
                    ratio = record.get("ratio_to_plain_backward")
                    ratio_text = "" if ratio is None else f"{ratio:.2f}"
                    faults = record.get("minor_faults_per_step")
                    faults_text = "" if faults is None else f"{faults:,.0f}"
                    row += [f"{record['median_s'] * 1e3:.2f}", ratio_text, faults_text]
                    if peak is None and record.get("peak_mem_mb") is not None:
                        peak = record["peak_mem_mb"]
                row.append("" if peak is None else f"{peak:.0f}")
                if any(row[2:]):
                    writer.writerow(row)
    return path


def write_targets_csv(results: dict, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["Target", "Method", "Allocator", "Met", "Worst (configuration)",
             "90% interval over resampled rounds", "Verdict outside the run's spread",
             "Required"]  # fmt: skip
        )
        for row in evaluate_targets(results):
            decided = {True: "yes", False: "no", None: ""}[row["decided"]]
            writer.writerow(
                [
                    row["target"],
                    row["method"],
                    row["allocator"],
                    f"{'yes' if row['met'] == row['checked'] else 'no'} "
                    f"({row['met']}/{row['checked']})",
                    f"{row['worst']} ({row['worst_config']})",
                    row["interval"] or "",
                    decided,
                    row["required"],
                ]
            )
    return path


def plot_setting(results: dict, allocator: str, path: Path) -> Path:
    """One panel per configuration: every method's median time relative to plain_backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if r["allocator"] == allocator]
    index = _index(records)
    configs, methods = _configs(records), _methods(records)
    device = results["meta"].get("device_name") or results["meta"]["device"]
    fig, axes = plt.subplots(
        1, len(configs), figsize=(max(2.6 * len(configs) + 1.6, 8.0), 4.4), sharey=True,
        squeeze=False,
    )
    for ax, config in zip(axes[0], configs):
        values, colors, labels = [], [], []
        for method in methods:
            record = index.get((allocator, config, method))
            ratio = record.get("ratio_to_plain_backward") if record else None
            values.append(float("nan") if ratio is None else ratio)
            colors.append(COLORS.get(method, "#777777"))
            labels.append(f"{record['median_s'] * 1e3:.1f} ms" if record else "")
        positions = range(len(methods))
        ax.barh(positions, values, color=colors)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        finite = [v for v in values if v == v] or [1.0]
        ax.set_xlim(min(finite) / 1.6, max(finite) * 6)
        for y, (value, label) in enumerate(zip(values, labels)):
            if value == value:
                ax.text(value * 1.08, y, label, va="center", fontsize=7)
        plain = index.get((allocator, config, "plain_backward"))
        plain_text = f"plain {plain['median_s'] * 1e3:.2f} ms" if plain else "no plain_backward"
        ax.set_title(f"{config}\n{plain_text}", fontsize=9)
        ax.set_xlabel("time / plain_backward", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    setting = "THP_MEM_ALLOC_ENABLE=1" if allocator == "thp" else "default allocator"
    fig.suptitle(
        f"Median step time relative to one plain forward+backward ({device}, {setting})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(results: dict, folder: Path) -> list[Path]:
    """Write every figure and table for the device of ``results`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    device = results["meta"]["device"]
    written = [
        write_results_csv(results, folder / f"{device}_results.csv"),
        write_targets_csv(results, folder / f"{device}_targets.csv"),
    ]
    for allocator in _allocators(results["records"]):
        written.append(plot_setting(results, allocator, folder / f"{device}_{allocator}.png"))
    return written


def gpu_section(results: dict | None) -> str:
    """The reST of the docs' GPU results: the device, its figure and tables, or why there are none.

    ``docs/conf.py`` writes it at every build from ``benchmarks/results_cuda.json`` into a file
    beside ``docs/benchmarks.rst`` (paths are relative to ``docs/``), so a GPU run
    (``python -m benchmarks.run --device cuda``) appears on the Benchmarks page, labelled with
    the device, as soon as its results and figures are committed.

    Args:
        results: The contents of ``results_cuda.json``, or ``None`` if there is none.

    Returns:
        reST text to be included in ``docs/benchmarks.rst``.
    """
    if results is None:
        return (
            "No GPU was available when the results on this page were produced, so it has CPU\n"
            "numbers only. Once a GPU run's ``benchmarks/results_cuda.json`` and ``cuda_*``\n"
            "figures are committed, they appear here, labelled with the device.\n"
        )
    meta = results["meta"]
    device = meta.get("device_name") or meta["device"]
    versions = meta.get("versions", {})
    peers = ", ".join(
        f"{name} {versions[key]}"
        for name, key in (("Opacus", "opacus"), ("BackPACK", "backpack-for-pytorch"))
        if versions.get(key)
    )
    lines = [
        f"Measured on **{device}** on {meta.get('date', 'an unrecorded date')}, torch "
        f"{versions.get('torch', '?')}" + (f", {peers}" if peers else "") + ": the same",
        "configurations, methods and checks as on the CPU, with the default allocator only (huge",
        "pages concern host memory). Times are taken between ``torch.cuda.synchronize()`` calls;",
        "peak memory is the rise of ``torch.cuda.max_memory_allocated``.",
        "",
    ]
    for allocator in _allocators(results["records"]):
        lines += [
            f".. figure:: _static/benchmarks/cuda_{allocator}.png",
            f"   :alt: Median step time of every method relative to plain_backward on {device}.",
            "   :width: 100%",
            "",
            f"   Time per step relative to one plain forward and backward on {device}.",
            "",
        ]
    for name, caption in (("targets", "The targets on the GPU"), ("results", "All numbers")):
        lines += [
            ".. csv-table:: " + caption,
            f"   :file: _static/benchmarks/cuda_{name}.csv",
            "   :header-rows: 1",
            "",
        ]
    return "\n".join(lines)
