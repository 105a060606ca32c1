"""When does the Gram ("ghost") norm beat materializing? Time both routes over (L, d_in, d_out).

The per-example squared norm of a layer applied at ``L`` positions,
:math:`\\|\\sum_t G_t A_t^\\top\\|_F^2`, is computed either from the two Gram matrices over
positions, :math:`\\sum_{t,s}(G_t\\cdot G_s)(A_t\\cdot A_s)`, or by forming the ``(d_out, d_in)``
gradient and squaring it (``L d_in d_out`` multiply-adds per example). Both routes are the
library's own (``goodfellow.layers.position_norms``): the Gram route forms only the blocks on
and above the diagonal of the symmetric Gram matrices, ``gram_count(L, d_in, d_out)``
multiply-adds (``L^2 (d_in + d_out)`` up to ``L = 128``, 3/4 of it at ``L = 256``, about 5/8 from
``L = 512`` on).
The library's count rule takes the Gram route when ``gram_count <= L d_in d_out`` (and times
both routes where the counts are within 4x of each other); the published rule (Li et al. 2022,
"Large language models can be strong differentially private learners") is
``2 L^2 < d_in d_out``. This script measures which route is faster on this machine and which
rule picks it.

Usage, from the repository root::

    python -m benchmarks.crossover [--n 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from goodfellow.layers.position_norms import formed_sq_norms, gram_count, gram_sq_norms

POSITIONS = (4, 16, 49, 64, 196, 256, 784)
LAYERS = ((25, 16), (75, 64), (400, 32), (576, 96), (864, 128), (1152, 512), (768, 768))
"""``(d_in, d_out)``: the conv layers of cnn-mnist and 3c3d (C_in K, C_out), a wide linear and
a GPT-2-sized projection."""


def _min_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls: on a shared machine the minimum is the call that was
    not preempted, which the median is not when other processes hold the cores."""
    fn()  # warm-up: the first call pays for allocation
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def measure(n: int, repeats: int) -> list[dict]:
    """One row per (L, d_in, d_out): both times in ms and the route each rule picks."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for positions, (d_in, d_out) in itertools.product(POSITIONS, LAYERS):
        A = torch.randn(n, positions, d_in, generator=generator)  # (n, L, d_in)
        G = torch.randn(n, positions, d_out, generator=generator)  # (n, L, d_out)
        torch.testing.assert_close(gram_sq_norms(A, G), formed_sq_norms(A, G), rtol=1e-3, atol=0)
        gram = _min_seconds(lambda A=A, G=G: gram_sq_norms(A, G), repeats)
        dense = _min_seconds(lambda A=A, G=G: formed_sq_norms(A, G), repeats)
        rows.append({
            "L": positions, "d_in": d_in, "d_out": d_out,
            "gram_ms": 1e3 * gram, "materialized_ms": 1e3 * dense,
            "current": gram_count(positions, d_in, d_out) <= positions * d_in * d_out,
            "published": 2 * positions**2 < d_in * d_out,
        })  # fmt: skip
    return rows


def best_constant(rows: list[dict], candidates=(0.25, 0.5, 1, 2, 4, 8, 16)) -> tuple[float, float]:
    """The ``c`` of "Gram when ``c gram_count <= L d_in d_out``" that loses least time.

    Returns:
        ``(c, extra)``: the constant and the total time it loses against always picking the
        faster route, in ms.
    """
    def lost(c: float) -> float:
        total = 0.0
        for r in rows:
            gram = c * gram_count(r["L"], r["d_in"], r["d_out"]) <= r["L"] * r["d_in"] * r["d_out"]
            chosen = r["gram_ms"] if gram else r["materialized_ms"]
            total += chosen - min(r["gram_ms"], r["materialized_ms"])
        return total

    return min(((c, lost(c)) for c in candidates), key=lambda pair: pair[1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| L | d_in | d_out | Gram ms | materialized ms | faster | current rule | published rule |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        faster = r["gram_ms"] < r["materialized_ms"]

        def verdict(gram: bool, faster: bool = faster) -> str:
            return ("Gram" if gram else "mat.") + ("" if gram == faster else " (slower)")

        lines.append(
            f"| {r['L']} | {r['d_in']} | {r['d_out']} | {r['gram_ms']:.2f} | "
            f"{r['materialized_ms']:.2f} | {'Gram' if faster else 'mat.'} | "
            f"{verdict(r['current'])} | {verdict(r['published'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover")
    parser.add_argument("--n", type=int, default=32, help="batch size")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per route")
    args = parser.parse_args(argv)
    rows = measure(args.n, args.repeats)
    print(markdown(rows))
    for rule in ("current", "published"):
        wrong = [r for r in rows if r[rule] != (r["gram_ms"] < r["materialized_ms"])]
        lost = sum(abs(r["gram_ms"] - r["materialized_ms"]) for r in wrong)
        print(f"{rule} rule: slower route on {len(wrong)} of {len(rows)} shapes, {lost:.1f} ms")
    c, lost = best_constant(rows)
    print(f"best c in 'Gram when c gram_count <= L d_in d_out': {c} ({lost:.1f} ms lost)")


if __name__ == "__main__":
    main()
