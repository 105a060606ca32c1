"""How the extra memory of ``norms_only`` and ``clipped_mean`` grows with the model's width.

Usage (from the repository root)::

    python -m benchmarks.memory [--quick] [--out benchmarks/results_memory.json]

The issue asks that the peak extra memory of the norms and of the clipped mean be O(n), not
O(n P). On a language model the recorder holds, from the forward until the statistic is
computed, every recorded layer's input and output gradient: ``n T (d_in + d_out)`` numbers per
layer, against ``n d_in d_out`` for that layer's per-example gradients. At a width ``d`` below
the sequence length ``T`` the first is the larger one, so a single configuration cannot tell
"grows with the activations" from "grows with n P". This script varies ``d`` at a fixed
``(n, T)``: ``n P`` grows as ``d^2``, an O(n T d) memory as ``d``.

For each width of ``tiny-lm`` (vocabulary 96, 4 heads, 2 blocks, as in :mod:`benchmarks.methods`)
and each of the two shapes ``T64-n32`` and ``T256-n8``, the peak tensor memory of one step of
``plain_backward``, ``norms_only`` and ``clipped_mean``
(:func:`benchmarks.run.peak_extra_mb`: torch's own allocator events, exact and repeatable), and
the bytes of the recorded inputs and output gradients after the step. A full run writes
``benchmarks/results_memory.json``; ``--quick`` (two small widths) writes under
``benchmarks/_scratch/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import methods as bm
from benchmarks.run import peak_extra_mb

WIDTHS = (64, 128, 256, 512)
QUICK_WIDTHS = (16, 32)
SHAPES = ((64, 32), (256, 8))
"""``(T, n)``: the two language-model shapes of the benchmark."""
QUICK_SHAPES = ((16, 4),)
METHODS = ("plain_backward", "norms_only", "clipped_mean")
HERE = Path(__file__).parent


def recorded_mb(recorder) -> float:
    """MiB of the distinct storages behind a recorder's inputs and output gradients."""
    sizes: dict[int, int] = {}
    for record in recorder.layers.values():
        for tensor in [*record.inputs, *record.grad_outputs]:
            if tensor is not None:
                storage = tensor.untyped_storage()
                sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values()) / 2**20


def measure(d: int, seq_len: int, n: int) -> dict:
    """One width and shape: each method's peak, n * P, and what the recorder held."""
    vocab, heads, blocks = bm.LM_WIDTHS[0], bm.LM_WIDTHS[2], bm.LM_WIDTHS[3]
    config = bm.Config("tiny-lm", (vocab, d, heads, blocks), n, "tiny-lm", seq_len)
    problem = bm.Problem(config, reference=False)
    record = {"d": d, "T": seq_len, "n": n, "n_P_mb": config.per_example_mb}
    for name in METHODS:
        method = bm.METHODS[name](problem)
        for _ in range(3):  # past the first batches, whose sums the recorder checks
            method.reset()
            method.step()
        record[f"{name}_peak_mb"] = peak_extra_mb(method)
        if name == "clipped_mean":  # keeps the records to the end (norms_only drops them)
            record["recorded_mb"] = recorded_mb(method.recorder)
    return record


def extra_cell(extra_mb: float, n_p_mb: float) -> str:
    """An extra peak in MiB with its share of n * P; a peak below the plain step's says so."""
    if extra_mb < 0:
        return f"{extra_mb:.1f} (below plain)"
    return f"{extra_mb:.1f} ({extra_mb / n_p_mb:.0%})"


def table(records: list[dict]) -> str:
    """The records as a Markdown table: the extra above ``plain_backward`` and its share of n P."""
    lines = [
        "| T, n | d | n * P MiB | plain MiB | norms_only extra | clipped_mean extra "
        "| recorded MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        plain, share = r["plain_backward_peak_mb"], r["n_P_mb"]
        extras = [r[f"{m}_peak_mb"] - plain for m in ("norms_only", "clipped_mean")]
        cells = [extra_cell(e, share) for e in extras]
        lines.append(
            f"| T{r['T']}, n{r['n']} | {r['d']} | {share:.1f} | {plain:.1f} | {cells[0]} | "
            f"{cells[1]} | {r['recorded_mb']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small widths, one small shape")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    widths, shapes = (QUICK_WIDTHS, QUICK_SHAPES) if args.quick else (WIDTHS, SHAPES)
    records = [measure(d, seq_len, n) for seq_len, n in shapes for d in widths]
    default = HERE / ("_scratch/results_memory.json" if args.quick else "results_memory.json")
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "records": records}, indent=1))
    print(table(records))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
