r"""What the recorder keeps of one module during a batch: a record per module, an entry per call.

:class:`goodfellow.PerExampleGradients` (:mod:`goodfellow.hooks`) owns one
:class:`LayerRecord` per module that a layer rule claims. Its forward hook appends, for every
call of the module, the call's input (held by a ``_Call`` that the hook on the call's output
keeps alive, so that a forward nobody differentiates frees it with its graph) and a slot for
the output gradient, which the tensor hook fills during the backward. After the backward the
record hands both to its rule (:mod:`goodfellow.layers`), scaled by the batch-size factor, and
gets the module's per-example gradients in the rule's form. The record knows no formula.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from goodfellow._accounting import accounting_due, check_accounted
from goodfellow._assembly import require_backward
from goodfellow._autocast import autocast_off
from goodfellow._checks import describe
from goodfellow.layers.base import LayerRule
from goodfellow.reduction import batch_size_factor

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients

__all__ = ["LayerRecord"]


class LayerRecord:
    r"""What one recorded module saw during the current batch: its inputs and output gradients.

    One record per module with a layer rule (``nn.Linear``, the convolutions, ...) lives in
    :attr:`goodfellow.PerExampleGradients.layers` for as long as the recorder exists; its lists
    are emptied when a new batch starts. Entry ``c`` of both lists belongs to the ``c``-th call
    of the module in the forward (a module applied twice has two).

    Attributes:
        name: The module's qualified name, as in ``model.named_modules()`` (``""`` for the root).
        module: The module itself.
        rule: The :class:`goodfellow.layers.LayerRule` that turns the record into gradients.
        inputs: One tensor per call, the layer's input :math:`a`, e.g. ``(n, ..., d_in)`` for a
            Linear and ``(n, C_in, *spatial)`` for a convolution.
        grad_outputs: One entry per call, :math:`\partial \mathcal{L} / \partial Z` of the
            *batch* loss exactly as autograd passed it, shaped like the output; not multiplied
            by the batch-size factor. ``None`` until the backward reaches that call (and for a call
            whose output does not reach the loss).
    """

    def __init__(
        self, name: str, module: nn.Module, rule: LayerRule, owner: PerExampleGradients
    ) -> None:
        self.name = name
        self.module = module
        self.rule = rule
        self.grad_outputs: list[Tensor | None] = []
        self.output_shapes: list[torch.Size] = []
        self._calls: list[_Call | weakref.ref] = []  # weak until the call's backward
        self._output_kinds: list[tuple[torch.dtype, torch.device]] = []
        self._n: int | None = None
        self.records_all_inputs = bool(getattr(rule, "records_all_inputs", False))
        # a rule that sees inside its calls (LayerRule.capture) gets what it saw there too
        self.captures = type(rule).capture is not LayerRule.capture
        self._open_capture = None  # entered for the call running now (goodfellow._recording)
        self._capture = None  # left, waiting for the call's forward hook
        self.batch_dim = _batch_dim(rule, module)
        self._owner = owner

    def _call(self, c: int) -> _Call | None:
        entry = self._calls[c]
        return entry if isinstance(entry, _Call) else entry()

    @property
    def inputs(self) -> list[Tensor | None]:
        """The input of each call (``None`` for a call whose graph was freed unused)."""
        calls = [self._call(c) for c in range(len(self._calls))]
        return [None if call is None else call.input for call in calls]

    @property
    def args(self) -> list[tuple | None]:
        """Every positional argument of each call (rules that ask for them)."""
        return [None if (call := self._call(c)) is None else call.args
                for c in range(len(self._calls))]  # fmt: skip

    @property
    def kwargs(self) -> list[dict | None]:
        """The keyword arguments of each call (rules that ask for them)."""
        return [None if (call := self._call(c)) is None else call.kwargs
                for c in range(len(self._calls))]  # fmt: skip

    @property
    def num_calls(self) -> int:
        """How many times the module ran in the current batch's forward."""
        return len(self._calls)

    @property
    def batch_size(self) -> int | None:
        """The number of examples ``n`` of the current batch, ``None`` before any call."""
        return self._n

    @property
    def scale(self) -> int:
        """The batch-size factor, ``1`` for ``"sum"`` and ``n`` for ``"mean"``.

        Raises:
            RuntimeError: If the module has not run in the current batch.
        """
        if self.batch_size is None:
            raise RuntimeError(
                f"{describe(self.name, self.module)} has not run in the current batch: run the "
                "model's forward while the recorder is attached."
            )
        return batch_size_factor(self._owner.loss_reduction, self.batch_size)

    @property
    def per_example_grad_outputs(self) -> list[Tensor]:
        r"""Each example's own output gradients :math:`\delta = \partial L_i / \partial Z_i`.

        ``grad_outputs`` multiplied by :attr:`scale`, one tensor per call of shape
        ``(n, ..., d_out)``. A call whose output did not reach the loss has zero gradient.
        Computed on every access (a cheap ``(n, ..., d_out)`` product).

        Raises:
            RuntimeError: If no ``loss.backward()`` has been recorded since the last forward.
        """
        require_backward(self._owner)
        scale = self.scale
        deltas = []
        for (dtype, device), g, shape in zip(
            self._output_kinds, self.grad_outputs, self.output_shapes
        ):
            if g is None:
                deltas.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                deltas.append(g * scale)  # shaped like the output
        return deltas

    def gradients(self, differentiable: bool = False) -> object:
        """This module's per-example gradients for the batch, as its rule keeps them.

        Calls whose output did not reach the loss are left out; a module none of whose calls
        did gets zeros.

        Args:
            differentiable: Keep the recorded inputs attached to their graph (for a
                backward that ran with ``create_graph=True``).

        Returns:
            A layer-gradients object (see :mod:`goodfellow.layers.base`).
        """
        scale = self.scale if self._calls else 1
        inputs, deltas, calls, captures, settings = [], [], [], [], set()
        for c, g in enumerate(self.grad_outputs):
            if g is None:
                continue  # this call's output did not reach the loss: it contributes zero
            call = self._call(c)  # kept strongly once its backward arrived
            inputs.append(call.input if differentiable else call.input.detach())
            deltas.append(g * scale if scale != 1 else g)  # dL_i/dZ_i
            if self.records_all_inputs:
                calls.append((call.args, call.kwargs))
                settings.add(call.autocast)
            if self.captures:
                captures.append(None if call.capture is None else call.capture.scaled(scale))
        if not deltas:
            return self.rule.zeros(self.module, self._owner._batch_size)
        extra = {"calls": calls} if self.records_all_inputs else {}
        if self.captures:
            extra["captures"] = captures
        with self._as_recorded(settings):
            layer = self.rule.gradients(self.module, inputs, deltas, **extra)
        if accounting_due(self._owner):
            with autocast_off():
                check_accounted(self._owner, self, layer, scale)
        return layer

    def _as_recorded(self, settings: set) -> contextlib.AbstractContextManager:
        """The autocast setting a rule computes under: off, or the calls' own for a rerun.

        A rule's formulas compute in the dtypes of the recorded tensors, whatever autocast is
        active when the gradients are read (:mod:`goodfellow._autocast`). A rule that reruns
        the module's forward from its recorded arguments (the fallback rule, attention's) must
        compute in the precision the calls did instead: under autocast their inputs come
        rounded to the lower precision and the parameters are rounded inside each operation,
        so a rerun outside it computes another function (or fails on the mixed dtypes). Rules
        that do not rerun the module record no setting (``settings`` empty).
        """
        if not settings or settings == {None}:
            return autocast_off()  # the rule's formulas, in the recorded tensors' dtypes
        if len(settings) > 1:
            raise ValueError(
                f"the calls of {describe(self.name, self.module)} in this batch ran under "
                f"different autocast settings ({sorted(map(str, settings))}); its rule reruns "
                "the module's forward from each call's arguments in one setting. Run every "
                "call of the module inside the same torch.autocast (or all outside it)."
            )
        ((device_type, dtype),) = settings
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def _add_call(self, call: weakref.ref, n: int, output: Tensor) -> int:
        """Append one call's entry, its gradient slot still empty; return the call's index."""
        self._calls.append(call)
        self._n = n if self._n is None else self._n
        self.grad_outputs.append(None)
        self.output_shapes.append(output.shape)
        self._output_kinds.append((output.dtype, output.device))
        return len(self._calls) - 1

    def _drop_calls_from(self, keep: int) -> None:
        """Forget every call after the first ``keep`` (those of a forward that raised)."""
        for entries in (self._calls, self.grad_outputs, self.output_shapes, self._output_kinds):
            del entries[keep:]
        if not self._calls:
            self._n = None

    def _release(self) -> None:
        """Drop this batch's inputs and output gradients, keeping how many calls there were.

        Used once a statistic taken during the backward has read them
        (``goodfellow._norm_stream``); the recorder then refuses to read the batch again.
        """
        self.grad_outputs = [None] * len(self.grad_outputs)
        self._calls = [_released] * len(self._calls)

    def clear(self) -> None:
        """Forget the current batch (new lists, so references to the old ones stay intact)."""
        self.grad_outputs = []
        self.output_shapes = []
        self._calls = []
        self._output_kinds = []
        self._n = None

    def __repr__(self) -> str:
        return (
            f"LayerRecord(name={self.name!r}, module={self.module!r}, "
            f"num_calls={self.num_calls}, batch_size={self.batch_size})"
        )


class _Call:
    """What one call of a recorded module keeps for its rule: its input (and all arguments).

    ``capture``: what the rule's :class:`goodfellow.layers.base.CallCapture` saw inside the
    call, for rules that have one. ``autocast``: where all arguments are kept (a rule that
    reruns the module), the autocast setting the call ran under, ``(device_type, dtype)``
    with ``dtype`` ``None`` outside autocast (:func:`autocast_setting`).
    """

    __slots__ = ("__weakref__", "args", "autocast", "capture", "input", "kwargs")

    def __init__(self, input: Tensor, args: tuple | None = None, kwargs: dict | None = None):
        self.input = input
        self.args = args
        self.kwargs = kwargs
        self.capture = None
        self.autocast = None if args is None else autocast_setting(input)


def autocast_setting(t: Tensor) -> tuple[str, torch.dtype | None] | None:
    """The autocast setting for ``t``'s device now: ``(device_type, dtype)``.

    ``dtype`` is ``None`` when autocast is off; the whole setting is ``None`` for a device that
    has no autocast (``"meta"``).
    """
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type):
        return None
    enabled = torch.is_autocast_enabled(device_type)
    return device_type, torch.get_autocast_dtype(device_type) if enabled else None


def _released() -> None:
    """The entry of a call whose input was dropped (see :meth:`LayerRecord._release`)."""
    return None


def _batch_dim(rule: LayerRule, module: nn.Module) -> int:
    """The dimension of a call's input and output that indexes the examples (0 unless told)."""
    batch_dim = getattr(rule, "batch_dim", None)
    return batch_dim(module) if callable(batch_dim) else 0
