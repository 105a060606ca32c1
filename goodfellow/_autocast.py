r"""Every formula of the package computes in the dtypes of its arguments, inside autocast too.

``torch.autocast`` rewrites the operations that run while it is active, whoever calls them: on
CPU the matrix products (``mm``, ``bmm``, ``addmm``, ``matmul``, ``einsum``, convolutions) run
in bfloat16. A statistic called inside the region a training step runs in would form its norms
and sums in bfloat16 and return them in it, mix dtypes where it accumulates into a buffer of
its own (``addmv`` refuses them), and the recorder's check that the per-example gradients add
up to autograd's would fail on the rounding alone. So every public function that computes runs
with autocast off for its duration (:func:`without_autocast`).

A layer that ran under autocast is reproduced all the same: its recorded inputs and output
gradients come in the dtype it computed in, and a rule that reruns a module from its recorded
arguments re-enters the setting the call ran under (``LayerRecord.gradients``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["autocast_off", "without_autocast"]

_DEVICE_TYPES = tuple(
    device for device in ("cpu", "cuda", "xpu", "mps", "hpu")
    if torch.amp.is_autocast_available(device)
)  # fmt: skip
"""The device types whose autocast is turned off (those this torch build knows)."""

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Turn off every autocast that is on, for the duration of the ``with`` block."""
    active = [device for device in _DEVICE_TYPES if torch.is_autocast_enabled(device)]
    if not active:  # the common case, at every statistic and record read: nothing to enter
        yield
        return
    with contextlib.ExitStack() as stack:
        for device in active:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def without_autocast(function: F) -> F:
    """Decorate a public function so that it computes with autocast off (module docstring)."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        with autocast_off():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
