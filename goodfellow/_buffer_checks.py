"""Checks of ``out=`` buffers: shape, dtype, device, layout, and no memory shared.

A buffer that overlaps another, or an input still to be read, would have entries overwritten
before they are used: the result has the right shape and the wrong numbers. So every public
function taking ``out=`` refuses that here (:func:`aliased_buffer` sweeps all buffers at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def memory_span(t: Tensor) -> tuple[int, int] | None:
    """First and one-past-last byte a tensor can touch; ``None`` if it touches no real memory."""
    if t.is_meta or t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # (>= 0)
    return start, start + (extent + 1) * t.element_size()


def overlap(x: Tensor, y: Tensor) -> bool:
    """Whether two tensors may share memory (exact for contiguous ones, cautious otherwise)."""
    span_x, span_y = memory_span(x), memory_span(y)
    if span_x is None or span_y is None:
        return False
    return span_x[0] < span_y[1] and span_y[0] < span_x[1] and x.device == y.device


def aliased_buffer(buffers: Sequence[Tensor], others: Sequence[Tensor] = ()) -> int | None:
    """Index of a buffer that may share memory with another buffer or with one of ``others``.

    One sweep over the memory spans sorted by their start, ``O(m log m)`` for ``m`` tensors
    (``others`` may overlap each other). Data pointers of two devices can coincide, so each
    device is swept on its own.
    """
    by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
    tagged = [*enumerate(buffers), *((-1, t) for t in others)]  # index -1: not a buffer
    for k, t in tagged:
        span = memory_span(t)
        if span is not None:
            by_device.setdefault(t.device, []).append((*span, k))
    for spans in by_device.values():
        buffer_end, buffer_index, other_end = -1, -1, -1  # furthest ends swept so far
        for begin, end, k in sorted(spans):
            if begin < buffer_end:
                return k if k >= 0 else buffer_index
            if k >= 0 and begin < other_end:
                return k
            if k >= 0:
                buffer_end, buffer_index = end, k
            else:
                other_end = max(other_end, end)
    return None


def check_buffer(
    buffer: object,
    label: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    contiguous: bool = True,
) -> None:
    """Refuse an ``out=`` buffer that cannot hold a ``dtype`` result of ``shape`` on ``device``.

    ``contiguous=False`` where the operation writing it handles any strides (``torch.bmm``'s
    ``out=``).
    """
    if not isinstance(buffer, Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(buffer).__name__}.")
    if tuple(buffer.shape) != shape or buffer.dtype != dtype or buffer.device != device:
        raise ValueError(
            f"{label} must be a {dtype} tensor of shape {shape} on {device}, got "
            f"{buffer.dtype} {tuple(buffer.shape)} on {buffer.device}."
        )
    if contiguous and not buffer.is_contiguous():
        raise ValueError(f"{label} must be contiguous.")


# ---------------------------------------------------------------------------------------------
# Buffers passed as out= to PerExampleGradients.compute_grads (and kept by reuse_buffers=True)


def check_out_buffers(
    out: Mapping[str, Tensor],
    specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]],
    differentiable: bool,
    recorded: Sequence[Tensor] = (),
) -> None:
    """Validate a workspace passed as ``out=`` against the results it must hold.

    ``recorded``: the tensors the results are computed from (the layers' recorded inputs and
    output gradients), which no buffer may share memory with.
    """
    if not isinstance(out, Mapping):
        raise TypeError(
            f"out must be a dict from parameter name to tensor, got {type(out).__name__}."
        )
    if differentiable:
        raise ValueError(
            "out= cannot be used when the backward ran with create_graph=True: writing into "
            "a buffer is not differentiable; call compute_grads() without out=."
        )
    if set(out) != set(specs):
        missing, extra = sorted(set(specs) - set(out)), sorted(set(out) - set(specs))
        raise ValueError(
            f"out must have exactly the keys of grads; missing {missing}, unexpected {extra}."
        )
    for p_name, (shape, dtype, device) in specs.items():
        check_buffer(out[p_name], f"out[{p_name!r}]", shape, dtype, device)
    # one buffer for two results, or for a result and what a later one is computed from:
    # entries would be overwritten before they are read
    refuse_aliased(out, recorded)


def refuse_aliased(out: Mapping[str, Tensor], recorded: Sequence[Tensor]) -> None:
    """Refuse buffers that share memory with each other or with a recorded tensor."""
    names = list(out)
    aliased = aliased_buffer([out[p_name] for p_name in names], recorded)
    if aliased is not None:
        raise ValueError(
            f"out[{names[aliased]!r}] shares memory with another entry of out or with a "
            "recorded input or output gradient; every parameter needs a buffer of its own."
        )


def storages(tensors: Sequence[Tensor]) -> frozenset[int]:
    """The addresses of the storages ``tensors`` live in: a cheap first test of sharing."""
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


def check_kept_workspace(
    workspace: Mapping[str, Tensor], kept_storages: frozenset[int], recorded: Sequence[Tensor]
) -> None:
    """:func:`check_out_buffers` for a recorder's own workspace, checked when it was kept.

    Its layout was checked once, when the recorder kept its results as the workspace
    (:func:`goodfellow._assembly.keep_workspace`), and its shapes fit this batch
    (:func:`buffers_fit`); what a new batch can change is a recorded tensor living in one of
    its buffers (an input made from the previous results). Only a recorded tensor in one of
    the workspace's storages is swept exactly.
    """
    if any(t.untyped_storage().data_ptr() in kept_storages for t in recorded):
        refuse_aliased(workspace, recorded)


def buffers_fit(
    workspace: Mapping[str, Tensor],
    specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]],
) -> bool:
    """Whether a kept workspace can hold this batch's results."""
    return set(workspace) == set(specs) and all(
        tuple(workspace[p_name].shape) == shape
        and workspace[p_name].dtype == dtype
        and workspace[p_name].device == device
        for p_name, (shape, dtype, device) in specs.items()
    )
