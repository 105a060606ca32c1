r"""What :class:`goodfellow.PerExampleGradients` does during the forward and the backward.

The recorder's hooks (:mod:`goodfellow.hooks`) call these functions with the recorder first:

* the model's forward pre-hook notes the batch size of the model's own input, which every
  recorded call must see on its batch dimension, and checks BatchNorm
  (:func:`on_model_forward`); its forward hook ends that forward (:func:`after_model_forward`);
* every recorded module's forward hook appends the call's entry to the module's
  :class:`goodfellow.LayerRecord` and hooks the call's output (:func:`on_layer_forward`);
* the tensor hook on that output keeps :math:`\partial\mathcal L/\partial Z` of the batch loss
  (:func:`output_gradient_hook`); a parameter's own hook keeps the gradient autograd gives it,
  for the accounting check (:func:`on_parameter_gradient`).

No formula is here: the rules (:mod:`goodfellow.layers`) turn the records into gradients.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from goodfellow._accounting import accounting_due
from goodfellow._checks import check_call_batch, describe, refuse_training_batchnorm
from goodfellow._hooking import (
    RECORDED_OUTPUTS,
    ModuleHook,
    hookable,
    in_backward,
    is_functorch,
    recorded_edges,
    refuse_other_output,
    refuse_recomputation,
    split_output,
)
from goodfellow.records import LayerRecord, _Call, autocast_setting

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients
    from goodfellow.layers.base import CallCapture


def on_model_forward(pe: PerExampleGradients, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the model: check BatchNorm, note the batch size of the input.

    BatchNorm may have been put in training mode since :meth:`attach`. The batch size of the
    model's own input is what every recorded call must see on its batch dimension: a module
    applied to a tensor without the batch (positions ``arange(T)``) or to the batch merged with
    another dimension (``(n * T, d)``) would otherwise pass for a batch of ``T`` or ``n * T``
    examples.
    """
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if not torch.is_grad_enabled() or (first is not None and is_functorch(first)):
        return
    if pe._forward_start is not None:
        drop_failed_forward(pe)
    pe._forward_start = {name: r.num_calls for name, r in pe.layers.items()}
    for name, batchnorm in pe._batchnorms:
        refuse_training_batchnorm(name, batchnorm)
    root = pe.layers.get("")
    dim = root.batch_dim if root is not None and root.module is pe.model else 0
    pe._model_batch_size = first.shape[dim] if first is not None and first.dim() > dim else None


def after_model_forward(
    pe: PerExampleGradients, module: nn.Module, args: tuple, output: object
) -> None:
    """Forward hook of the model: calls of a submodule run on its own are not checked."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or not is_functorch(first):
        pe._model_batch_size = None
        pe._forward_start = None


def on_parameter_gradient(pe: PerExampleGradients, p_name: str, grad: Tensor) -> None:
    """Keep the gradient autograd gives a parameter: the first one of each batch.

    A backward run inside ``torch.autocast`` computes it in the lower precision (the dtype
    stays the parameter's): the accounting check then allows for that precision.
    """
    if pe._attached and p_name not in pe._totals:
        pe._totals[p_name] = grad
        setting = autocast_setting(grad) if accounting_due(pe) else None
        if setting is not None and setting[1] is not None:
            pe._totals_autocast = setting[1]
        if pe._stream is not None:
            pe._stream.parameter_gradient(p_name)


def drop_failed_forward(pe: PerExampleGradients) -> None:
    """Forget the calls of a model forward that raised before it returned.

    A forward that raises (a bad batch skipped with ``try``/``except``) never reaches the
    model's forward hook; its partial calls would otherwise stay in the batch, and the next
    batch of another size would be refused. What was recorded before it stays.
    """
    for name, record in pe.layers.items():
        record._drop_calls_from(pe._forward_start.get(name, 0))
    if not any(record.num_calls for record in pe.layers.values()):
        pe._batch_size = None
    pe._forward_start = None


def on_layer_forward(
    pe: PerExampleGradients, name: str, module: nn.Module, args: tuple, kwargs: dict,
    output: object,
) -> None:
    """The forward hook of one recorded module: keep its input, hook its output's gradient."""
    record = pe.layers[name]
    output, others = split_output(record, output)
    if not isinstance(output, Tensor):
        return  # a module returning no tensor: nothing to hook
    if not (torch.is_grad_enabled() and output.requires_grad) or is_functorch(output):
        return  # no backward of ours can come through this call
    refuse_recomputation(record, module)
    if pe._backward_seen:
        pe.clear()
    a = args[0] if args else next(iter(kwargs.values()))
    n = check_call_batch(record, module, a, pe._model_batch_size, pe._batch_size)
    if pe._batch_size is None:
        pe._batch_size = n
    # The input is held by the hook on this call's output, so it lives as long as the output's
    # graph: a forward nobody differentiates (an evaluation with gradients on) frees it with
    # its graph instead of keeping it until the next backward.
    pending = _Call(a, args, dict(kwargs)) if record.records_all_inputs else _Call(a)
    call = record._add_call(weakref.ref(pending), n, output)
    _hook(pe, output, output_gradient_hook(pe, record, call, pe._generation, output.shape, pending))
    capture, record._capture = record._capture, None
    if capture is not None and capture.outputs:
        pending.capture = capture
        for j, inner in enumerate(capture.take_outputs()):
            hook = captured_gradient_hook(pe, record, capture, j, pe._generation, inner.shape)
            _hook(pe, inner, hook)
    for k, other in others:
        refuse = refuse_other_output(record, k, pe._generation, pe)
        pe._tensor_handles.append(other.register_hook(refuse))


def register_hooks(pe: PerExampleGradients) -> list[torch.utils.hooks.RemovableHandle]:
    """Every module hook of the recorder: the model's, each recorded module's, each parameter's."""
    model = pe.model
    handles = [
        model.register_forward_pre_hook(ModuleHook(pe, on_model_forward)),
        model.register_forward_hook(ModuleHook(pe, after_model_forward)),
    ]
    for name, record in pe.layers.items():
        handles += register_layer_hooks(pe, name, record)
    for p_name in pe._owners:
        hook = ModuleHook(pe, on_parameter_gradient, p_name)
        handles.append(pe._params[p_name].register_hook(hook))
    return handles


def register_layer_hooks(
    pe: PerExampleGradients, name: str, record: LayerRecord
) -> list[torch.utils.hooks.RemovableHandle]:
    """The module hooks of one recorded module: its forward hook, and its capture's if any.

    Both forward hooks go in front of the module's other forward hooks (``prepend``): a hook of
    the user's that returns a changed output (a mask, a scale) then runs after the recorder has
    hooked the module's own output :math:`Z`, whose gradient is what the rule needs. The
    capture's forward hook runs first, so that it has left the capture when
    :func:`on_layer_forward` runs, and with ``always_call``, so that a forward that raises
    leaves it too.
    """
    module, handles = record.module, []
    layer_hook = ModuleHook(pe, on_layer_forward, name)
    handles.append(module.register_forward_hook(layer_hook, with_kwargs=True, prepend=True))
    if record.captures:
        handles.append(module.register_forward_pre_hook(ModuleHook(pe, start_capture, name)))
        end = ModuleHook(pe, end_capture, name)
        handles.append(module.register_forward_hook(end, always_call=True, prepend=True))
    return handles


def _hook(pe: PerExampleGradients, output: Tensor, hook: Callable[[Tensor], None]) -> None:
    """Register ``hook`` on ``output``; mark its node for :meth:`PerExampleGradients.backward`."""
    hooked = hookable(output)
    if hooked.grad_fn is not None:  # found there by backward(): no reference to the graph
        hooked.grad_fn.metadata.setdefault(RECORDED_OUTPUTS, set()).add(hooked.output_nr)
    pe._tensor_handles.append(hooked.register_hook(hook))


def start_capture(pe: PerExampleGradients, name: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a module whose rule sees inside its calls: enter the capture."""
    record = pe.layers[name]
    record._capture = None
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if not torch.is_grad_enabled() or in_backward() or (first is not None and is_functorch(first)):
        return  # no call the recorder keeps
    record._open_capture = record.rule.capture(module)
    if record._open_capture is not None:
        record._open_capture.__enter__()


def end_capture(
    pe: PerExampleGradients, name: str, module: nn.Module, args: tuple, output: object
) -> None:
    """Forward hook, run also when the forward raised: leave the capture entered before it."""
    record = pe.layers[name]
    capture, record._open_capture = record._open_capture, None
    if capture is not None:
        capture.__exit__(None, None, None)
        record._capture = capture  # for on_layer_forward, which runs next


def captured_gradient_hook(
    pe: PerExampleGradients, record: LayerRecord, capture: CallCapture, j: int,
    generation: int, shape: torch.Size,
) -> Callable[[Tensor], None]:
    """The tensor hook on a captured intermediate: keep its gradient, the first of the batch."""

    def gradient_hook(grad: Tensor) -> None:
        if pe._attached and generation == pe._generation and capture.grad_outputs[j] is None:
            capture.grad_outputs[j] = grad.reshape(shape)
            if pe._stream is not None:
                pe._stream.output_gradient(record.name)

    return gradient_hook


def output_gradient_hook(
    pe: PerExampleGradients, record: LayerRecord, call: int, generation: int,
    shape: torch.Size, pending: _Call,
) -> Callable[[Tensor], None]:
    """The tensor hook on one call's output: keep dL/dZ of the batch loss.

    The call's input is held here until the hook fires and by the record after that, so that
    a record dropped during the backward (``goodfellow._norm_stream``) frees it.
    """
    held = [pending]

    def gradient_hook(grad_output: Tensor) -> None:
        if not pe._attached:
            return
        if generation != pe._generation:
            raise RuntimeError(
                f"the backward reached the output of {describe(record.name, record.module)} "
                "from an earlier batch: after a backward (or clear(), or attach()) the next "
                "forward starts a new batch and the old records are gone. Call backward on "
                "the loss of a forward run since."
            )
        if pe._forward_start is not None:  # no backward runs inside a forward: it raised
            drop_failed_forward(pe)
        recorded = record.grad_outputs[call]
        if recorded is not None and recorded.requires_grad:
            # Recorded with create_graph=True: differentiating the results runs a backward
            # through this forward's graph again, which brings d(penalty)/dZ here, not the
            # loss's gradient. Keep the first one.
            return
        if recorded is not None or pe._consumed:
            raise RuntimeError(
                "a second backward went through the same forward "
                f"({describe(record.name, record.module)}, call {call}); PerExampleGradients "
                "records one backward per forward. Run the model again before each backward, "
                "or add the losses and call backward once."
            )
        grad_output = grad_output.reshape(shape)  # a no-op unless hooked on the 2-d base
        record.grad_outputs[call] = grad_output  # (n, ..., d_out), dL/dZ of the batch loss
        record._calls[call] = held.pop()  # the input is needed now: the record keeps it
        pe._backward_seen = True
        pe._grads = None
        if pe._stream is not None:
            pe._stream.output_gradient(record.name)

    return gradient_hook


def backward_to_outputs(
    pe: PerExampleGradients, loss: Tensor, edges: list[GradientEdge], retain_graph: bool = False
) -> None:
    """``torch.autograd.grad`` to ``edges``, and to the recorded parameters on checked batches.

    The parameters' gradients reach their hooks for the accounting check
    (``goodfellow._accounting``) and are discarded; no ``.grad`` is written. ``retain_graph``
    keeps the graph for a second backward (``goodfellow.ghost_clipping``).
    """
    checked = [pe._params[p] for p in pe._owners] if accounting_due(pe) else []
    torch.autograd.grad(
        loss, edges + checked, retain_graph=retain_graph, allow_unused=True,
        materialize_grads=False,
    )  # fmt: skip


def edges_to_recorded_outputs(loss: Tensor) -> list[GradientEdge]:
    """Where :meth:`PerExampleGradients.backward` stops: the recorded outputs in ``loss``'s graph.

    Raises:
        TypeError: If ``loss`` is not a tensor.
        ValueError: If it is not a scalar that requires grad.
        RuntimeError: If no recorded output waits for its gradient in its graph.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}.")
    if loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            f"loss must be a scalar that requires grad, got shape {tuple(loss.shape)} with "
            f"requires_grad={loss.requires_grad}; reduce it over the batch (sum or mean, "
            "as loss_reduction says) before the backward."
        )
    edges = recorded_edges(loss)
    if not edges:
        raise RuntimeError(
            "no recorded layer output is waiting for its gradient in this loss's graph: run "
            "the model's forward while the recorder is attached before pe.backward(loss), "
            "once per forward."
        )
    return edges
