"""Argument checks of the linear rule's public functions (:mod:`goodfellow.layers.linear`)."""

from __future__ import annotations

from torch import Tensor

from goodfellow._buffer_checks import check_buffer, overlap
from goodfellow._checks import check_feature_tensor


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
    if grad_outputs.dtype != inputs.dtype or grad_outputs.device != inputs.device:
        raise ValueError(
            f"grad_outputs is {grad_outputs.dtype} on {grad_outputs.device} but inputs is "
            f"{inputs.dtype} on {inputs.device}; cast both to one dtype on one device."
        )
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
