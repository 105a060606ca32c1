"""Argument checks of the linear rule's public functions (:mod:`goodfellow.layers.linear`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from goodfellow._buffer_checks import check_buffer, overlap
from goodfellow._checks import check_feature_tensor, check_same_kind


def _check_outer_arguments(grad_outputs: Tensor, inputs: Tensor, out: Tensor | None) -> None:
    """Refuse arguments of :func:`batched_outer` that torch would broadcast or reshape silently."""
    for name, t in (("grad_outputs", grad_outputs), ("inputs", inputs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    g_shape, a_shape = tuple(grad_outputs.shape), tuple(inputs.shape)
    # broadcasting (a batch of 1 against n) or a reshape of another batch size into n rows would
    # return a tensor of the right shape holding the wrong numbers
    if grad_outputs.dim() < 2 or g_shape[:-1] != a_shape[:-1]:
        raise ValueError(
            f"grad_outputs of shape {g_shape} and inputs of shape {a_shape} do not fit: they "
            "must be (n, ..., d_out) and (n, ..., d_in) with the same n and the same middle "
            "dimensions (the layer's output gradient and its input, example by example)."
        )
    check_same_kind(grad_outputs, "grad_outputs", inputs, "inputs")
    if out is None:
        return
    shape = (g_shape[0], g_shape[-1], a_shape[-1])
    check_buffer(out, "out", shape, inputs.dtype, inputs.device, contiguous=False)
    if overlap(out, grad_outputs) or overlap(out, inputs):
        raise ValueError(
            "out shares memory with grad_outputs or inputs; the products would read entries "
            "already overwritten: pass a separate buffer."
        )


def _check_uses(uses: list, name: str) -> None:
    """Refuse an empty list of a layer's uses, or a use that is no floating ``(n, ..., d)``."""
    if not uses:
        raise ValueError(f"{name} is empty: pass the tensor recorded at each use of the layer.")
    for k, t in enumerate(uses):
        check_feature_tensor(t, name if len(uses) == 1 else f"{name}[{k}]")


def _check_factor_arguments(inputs: object, grad_outputs: object) -> None:
    """Refuse :func:`linear_factors` arguments that are not one layer's uses, pair by pair."""
    if isinstance(inputs, Tensor) != isinstance(grad_outputs, Tensor):
        raise ValueError(
            "pass inputs and grad_outputs both as tensors or both as lists (one per use)."
        )
    if not isinstance(inputs, Tensor):
        if not isinstance(inputs, Sequence) or not isinstance(grad_outputs, Sequence):
            raise TypeError("inputs and grad_outputs must be tensors or lists of tensors.")
        if len(inputs) != len(grad_outputs):
            raise ValueError(
                f"got {len(inputs)} inputs but {len(grad_outputs)} grad_outputs: pass one of "
                "each per use of the layer."
            )
        pairs = list(zip(inputs, grad_outputs))
    else:
        pairs = [(inputs, grad_outputs)]
    for k, (a, g) in enumerate(pairs):
        if isinstance(a, Tensor) and isinstance(g, Tensor) and a.shape[:-1] != g.shape[:-1]:
            raise ValueError(
                f"use {k}: inputs of shape {tuple(a.shape)} and grad_outputs of shape "
                f"{tuple(g.shape)} must agree in all but the last (feature) dimension."
            )


def _check_laid_out(A: Tensor, G: Tensor) -> None:
    """Refuse laid-out factors ``(n, T, d)`` of two dtypes or devices, or of an empty batch."""
    check_same_kind(A, "inputs", G, "grad_outputs")
    if A.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0).")
