r"""Per-example gradient norms taken during the backward, each layer's records dropped there.

:func:`goodfellow.gradient_norms` of :func:`goodfellow.recorded_factors` reads every layer's
inputs :math:`A` and output gradients :math:`G` after the backward, so the recorder holds all
of them until then: :math:`n T \sum_l (d_{in,l} + d_{out,l})` numbers, where autograd alone
would have freed each layer's :math:`G` (and the input it saved) as soon as the backward had
passed the layer. For a sequence model whose length :math:`T` exceeds its width that is more
than the :math:`n P` numbers of the per-example gradients themselves.

A squared norm adds up over the layers, :math:`\|g_i\|^2 = \sum_l \|g_{l,i}\|^2`, and layer
:math:`l`'s part needs only its own :math:`A_l` and :math:`G_l`. So
:meth:`goodfellow.PerExampleGradients.backward_with_norms` takes each layer's part inside the
backward, in the tensor hook that brings the layer's last output gradient, and drops the
layer's records right there: what the norms hold above the plain backward is then one layer's
work (its Gram matrices or its formed per-example gradient), never all layers' factors.
The formula is the rules' own (``summed_sq_norms``); only the moment it runs differs.

When a layer is complete:

* every call of it has its output gradient, and a rule that sees inside its calls
  (``nn.MultiheadAttention``) has the gradients of what it captured there;
* Linear layers reading the same input (the query, key and value projections of a block)
  wait for each other, so that they share their input's Gram matrix as after the backward;
  so do the embeddings (a token and a position embedding added together share their output
  gradient);
* on the batches whose sums are checked against autograd's (``goodfellow._accounting``) the
  layer's parameters have received their gradient from autograd, which arrives just after
  the layer's backward; the check runs as it does after the backward.

A call whose output never reaches the loss never completes its layer: what is left when the
backward ends is taken then, the same way.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from goodfellow._accounting import accounting_due
from goodfellow._assembly import require_backward
from goodfellow._autocast import autocast_off
from goodfellow._recording import backward_to_outputs, edges_to_recorded_outputs
from goodfellow.layers.base import norm_from_squares
from goodfellow.layers.shared_inputs import _same_tensor_key, summed_sq_norms
from goodfellow.sources import factored_records, record_factors

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients
    from goodfellow.records import LayerRecord


def backward_with_norms(
    pe: PerExampleGradients, loss: Tensor, retain_graph: bool = False
) -> Tensor:
    """What :meth:`goodfellow.PerExampleGradients.backward_with_norms` does.

    ``retain_graph`` keeps the graph for a second backward (``goodfellow.ghost_clipping``).
    """
    edges = edges_to_recorded_outputs(loss)
    records = factored_records(pe)
    if not records:
        raise ValueError("the recorder holds no layer with a trainable weight.")
    stream = NormStream(pe, records)
    pe._stream = stream
    try:
        backward_to_outputs(pe, loss, edges, retain_graph)
        require_backward(pe)
        squares = stream.finish()  # (n,)
    finally:
        pe._stream = None
        # what was taken is gone, also from a backward that raised halfway
        pe._consumed = pe._consumed or stream.released
    return norm_from_squares(squares)


class NormStream:
    """The squared norms of one backward, added up layer by layer as the layers complete.

    Args:
        pe: The recorder whose backward this is.
        records: ``(name, record)`` of every layer with a trainable parameter.
    """

    def __init__(self, pe: PerExampleGradients, records: list[tuple[str, LayerRecord]]) -> None:
        self.due = accounting_due(pe)
        self.pending: dict[str, LayerRecord] = dict(records)  # not yet taken
        # frozen layers have no norms; their records are dropped as soon as they are complete
        self.frozen = {name: r for name, r in pe.layers.items() if name not in self.pending}
        self.group: dict[str, Hashable] = {}
        self.size: dict[Hashable, int] = {}  # layers in each group
        self.ready: dict[Hashable, list[tuple[LayerRecord, object]]] = {}
        self.squares: list[Tensor] = []  # (n,) per group taken
        self.released = False  # whether any record was dropped
        self.awaited: dict[str, set[str]] = {}  # layer -> parameters autograd has yet to give
        self.layer_of: dict[str, str] = {}  # parameter -> its layer, for those awaited
        for name, record in records:
            key = _group_key(name, record)
            self.group[name] = key
            self.size[key] = self.size.get(key, 0) + 1
            if self.due:
                awaited = set()
                for suffix in record.rule.parameter_names(record.module):
                    p_name = pe._param_names.get((name, suffix))
                    if p_name is not None and len(pe._owners.get(p_name, ())) == 1:
                        awaited.add(p_name)  # a tied parameter is checked as a whole elsewhere
                        self.layer_of[p_name] = name
                self.awaited[name] = awaited

    def output_gradient(self, name: str) -> None:
        """An output gradient of layer ``name`` (or of what its rule captured) arrived."""
        frozen = self.frozen.get(name)
        if frozen is not None and _complete(frozen):
            frozen._release()
            self.released = True
            return
        self._take_if_complete(name)

    def parameter_gradient(self, p_name: str) -> None:
        """Autograd gave parameter ``p_name`` its gradient (on a checked batch)."""
        name = self.layer_of.get(p_name)
        if name is not None:
            self.awaited[name].discard(p_name)
            self._take_if_complete(name)

    def _take_if_complete(self, name: str) -> None:
        record = self.pending.get(name)
        if record is None or self.awaited.get(name) or not _complete(record):
            return
        del self.pending[name]
        key = self.group[name]
        ready = self.ready.setdefault(key, [])
        ready.append((record, record_factors(record)))
        if len(ready) == self.size[key]:
            self._take(self.ready.pop(key))

    def _take(self, ready: list[tuple[LayerRecord, object]]) -> None:
        with autocast_off():  # a backward inside autocast: the norms still in the records' dtypes
            self.squares.append(summed_sq_norms([layer for _, layer in ready]))  # (n,)
        for record, _ in ready:
            record._release()
        self.released = True

    def finish(self) -> Tensor:
        """Take what the backward left (calls that did not reach the loss); the sum, ``(n,)``."""
        left = [entry for ready in self.ready.values() for entry in ready]
        left += [(record, record_factors(record)) for record in self.pending.values()]
        if left:
            self._take(left)
        self.pending, self.ready = {}, {}
        return sum(self.squares)


def _complete(record: LayerRecord) -> bool:
    """Whether every call of ``record`` (and everything its rule captured) has its gradient."""
    if not record.grad_outputs or any(g is None for g in record.grad_outputs):
        return False
    if record.captures:
        for c in range(record.num_calls):
            call = record._call(c)
            if call.capture is not None and not call.capture.complete:
                return False
    return True


def _group_key(name: str, record: LayerRecord) -> Hashable:
    """Layers that wait for each other: a Linear's one input, all embeddings; else itself."""
    module = record.module
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, nn.Linear) and record.num_calls == 1:
        call = record._call(0)
        if call is not None and call.input.dim() > 2:  # applied at positions: Grams to share
            return _same_tensor_key(call.input)
    return ("layer", name)
