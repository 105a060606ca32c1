"""The whole model's per-example gradients, put together from the recorder's records.

:meth:`goodfellow.PerExampleGradients.compute_grads` asks each record's rule for its module's
per-example gradients and lays them out per parameter of the model: under the parameter's
name in ``model.named_parameters()``, in its dtype (also under autocast), a parameter shared by
several modules (tied weights) as the sum of their parts, into the caller's ``out=`` buffers
where given. Also here: whether the result must be differentiable (a backward with
``create_graph=True``), what a result buffer must look like, and the refusal to read results
before a forward and a backward were recorded. No formula: the rules hold those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from goodfellow._autocast import without_autocast
from goodfellow._buffer_checks import (
    aliased_buffer,
    buffers_fit,
    check_kept_workspace,
    check_out_buffers,
    storages,
)

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients

Specs = dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]


def require_backward(pe: PerExampleGradients) -> None:
    """Raise a clear error unless a forward and a backward of this batch were recorded."""
    if pe._batch_size is None:
        raise RuntimeError(
            "nothing recorded yet: run the model's forward and loss.backward() while the "
            "recorder is attached (inside `with PerExampleGradients(model) as pe:`). If "
            "the forward did run, it ran where module hooks do not: in a model compiled "
            "with torch.compile (or TorchScript) before the recorder attached, or under "
            "torch.no_grad(); record the uncompiled model."
        )
    if not pe._backward_seen:
        raise RuntimeError(
            "a forward was recorded but no backward: call loss.backward() on the loss of "
            "that forward (while attached) before reading per-example gradients."
        )
    if pe._consumed:
        raise RuntimeError(
            "this batch's records were used up by backward_with_norms(), which drops each "
            "layer's inputs and output gradients as soon as its norms are taken. To read "
            "anything else of the batch as well, use pe.backward(loss) (or loss.backward()) "
            "and goodfellow.gradient_norms(goodfellow.recorded_factors(pe)) instead."
        )


def differentiable(pe: PerExampleGradients) -> bool:
    """Whether the recorded output gradients carry a graph (backward with create_graph)."""
    if not torch.is_grad_enabled():
        return False
    return any(
        g is not None and g.requires_grad
        for record in pe.layers.values()
        for g in record.grad_outputs
    )


def result_specs(pe: PerExampleGradients) -> Specs:
    """Shape, dtype and device of each result for the current batch."""
    params = pe._params
    return {
        p_name: ((pe._batch_size, *params[p_name].shape), params[p_name].dtype,
                 params[p_name].device)
        for p_name in pe._owners
    }  # fmt: skip


def reusable_workspace(pe: PerExampleGradients) -> dict[str, Tensor] | None:
    """The previous batch's results, if ``reuse_buffers`` is on and they fit this batch."""
    workspace = pe._workspace
    if not pe.reuse_buffers or workspace is None or differentiable(pe):
        return None
    return workspace if buffers_fit(workspace, result_specs(pe)) else None


def keep_workspace(pe: PerExampleGradients, grads: dict[str, Tensor]) -> None:
    """Keep this batch's results to write the next batch's into (``reuse_buffers=True``).

    Results that could not take a later batch's (not contiguous, or two sharing memory) are
    not kept: the next batch allocates its own. Their layout is checked here, once, not at
    every batch they are reused for.
    """
    if not pe.reuse_buffers or differentiable(pe) or grads is pe._workspace:
        return
    buffers = list(grads.values())
    if all(t.is_contiguous() for t in buffers) and aliased_buffer(buffers) is None:
        pe._workspace, pe._workspace_storages = grads, storages(buffers)
    else:
        pe._workspace, pe._workspace_storages = None, frozenset()


@without_autocast
def assemble(
    pe: PerExampleGradients, out: Mapping[str, Tensor] | None, kept: bool = False
) -> dict[str, Tensor]:
    """Every recorded parameter's per-example gradients, ``(n, *param.shape)`` each.

    ``kept``: ``out`` is the recorder's own workspace as :func:`reusable_workspace` returned it
    (its layout checked when it was kept, its shapes against this batch just now).
    """
    require_backward(pe)
    graph = differentiable(pe)
    if out is not None:
        recorded = [
            t
            for record in pe.layers.values()
            for t in (*record.inputs, *record.grad_outputs)
            if isinstance(t, Tensor)
        ]
        if kept:
            check_kept_workspace(out, pe._workspace_storages, recorded)
        else:
            check_out_buffers(out, result_specs(pe), graph, recorded)
    params = pe._params
    grads: dict[str, Tensor] = {}
    with torch.set_grad_enabled(graph):
        for record in pe.layers.values():
            names = record.rule.parameter_names(record.module)
            if not names:
                continue
            full = [pe._param_names[(record.name, suffix)] for suffix in names]
            # a buffer only for a parameter no other module shares (tied weights add up)
            # (and not under autocast, where the products come in the compute dtype)
            autocast = any(
                g is not None and g.dtype != params[full[0]].dtype for g in record.grad_outputs
            )
            buffers = [
                out[p] if out is not None and len(pe._owners[p]) == 1 and not autocast else None
                for p in full
            ]
            per_example = record.gradients(graph).per_example(buffers)
            for p_name, g in zip(full, per_example):
                dtype = params[p_name].dtype
                g = g if g.dtype == dtype else g.to(dtype)  # like .grad, also under autocast
                grads[p_name] = g if p_name not in grads else grads[p_name] + g
    for p_name, buffer in (out or {}).items():
        if grads[p_name] is not buffer:  # shared parameters were summed out of place
            grads[p_name] = buffer.copy_(grads[p_name])
    return {p_name: grads[p_name] for p_name in pe._owners}
