"""Equivalent computations, timed once per shape: the faster one runs from then on.

Some quantities have several exact formulas whose speed depends on the shapes and the
hardware more than any operation count predicts. A convolution's per-example weight gradient,
for instance, is either the unfolded patches times the output gradients (one batched matrix
product, after copying every input value ``K`` times) or the layer's own weight-gradient kernel
run with the examples as groups (no copy, but a kernel tuned for few large groups). On two
CPU cores the first is 3x faster for a 1-channel 28x28 input and the second 1.7x faster for
16 channels at 14x14; on a GPU the answer differs again.

So, as ``torch.backends.cudnn.benchmark`` does for convolution algorithms, :func:`fastest`
runs every route the first time a shape is seen (twice untimed, so that first-call costs such
as allocating, mapping fresh memory or building a kernel do not decide, then three timed runs
each, in turns, the fastest of each counting), remembers the winner
for that shape, and runs only the winner afterwards. The routes compute the same numbers up to
rounding (the order of the sums differs); each is tested on its own through :func:`forced`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["choice", "chosen", "fastest", "forced", "forced_route"]

_CHOSEN: dict[Hashable, str] = {}
_TIMED_ROUNDS = 3
"""Each route is timed this many times, in turns, and its fastest run counts. With one timing
each, a process on a shared 2-core machine picked the grouped route for ``3c3d``'s second
convolution, which runs 1.2-1.5x slower there than the unfolded one in steady state, and kept
it for the rest of the process."""
_UNTIMED_ROUNDS = 2
"""Each route first runs this many times untimed, in turns. With one untimed run, one process
in four on a 2-core AMD EPYC picked the grouped kernel for ``cnn-mnist``'s first convolution
at its first step (memory not yet mapped, caches cold), 2x slower than the unfolded patches in
every later step."""
_FORCED: list[str] = []


def fastest(key: Hashable, routes: Mapping[str, Callable[[], Any]], device: torch.device) -> Any:
    """Run the route that was fastest for ``key``; time them all the first time.

    Args:
        key: Everything the speed depends on (shapes, hyper-parameters, dtype, device).
        routes: Name -> a function computing the result; all give the same result.
        device: Where the work runs (a CUDA device is synchronized around each timing).

    Returns:
        The result of the chosen route (of the last one timed, on the first call).
    """
    name = _known_choice(key, routes)
    return routes[name]() if name is not None else _time_routes(key, routes, device)


def choice(key: Hashable, routes: Mapping[str, Callable[[], Any]], device: torch.device) -> str:
    """The name of the route :func:`fastest` runs for ``key``, timing them the first time."""
    name = _known_choice(key, routes)
    if name is None:
        _time_routes(key, routes, device)
        name = _CHOSEN[key]
    return name


def _known_choice(key: Hashable, routes: Mapping[str, Callable[[], Any]]) -> str | None:
    """The forced route where it is a candidate, else the remembered winner (or ``None``)."""
    if _FORCED and _FORCED[-1] in routes:
        return _FORCED[-1]
    return _CHOSEN.get(key)


def _time_routes(
    key: Hashable, routes: Mapping[str, Callable[[], Any]], device: torch.device
) -> Any:
    """Time every route in turns, remember the fastest for ``key``; the last result."""
    for _ in range(_UNTIMED_ROUNDS):  # the first runs pay allocations and kernel set-up
        for route in routes.values():
            route()
    timings = dict.fromkeys(routes, math.inf)
    for _ in range(_TIMED_ROUNDS):  # interleaved: a slow spell of the machine hits every route
        for name, route in routes.items():
            _synchronize(device)
            start = time.perf_counter()
            result = route()
            _synchronize(device)
            timings[name] = min(timings[name], time.perf_counter() - start)
    _CHOSEN[key] = min(timings, key=timings.__getitem__)
    return result


def chosen() -> dict[Hashable, str]:
    """The route chosen for each key seen so far (a copy)."""
    return dict(_CHOSEN)


def forced_route() -> str | None:
    """The route name :func:`forced` is forcing now, if any."""
    return _FORCED[-1] if _FORCED else None


@contextmanager
def forced(name: str) -> Iterator[None]:
    """Run route ``name`` wherever it is one of the candidates, without timing (for tests)."""
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
