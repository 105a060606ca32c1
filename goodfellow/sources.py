r"""Sources of per-example gradients: what a statistic accepts, checked once, read one way.

A statistic of :mod:`goodfellow.statistics` takes per-example gradients materialized (a list or
dict of ``(n, *param.shape)`` tensors) or as layer rules keep them (a
:class:`goodfellow.LinearFactors`, a list or dict of layer-gradients objects, such as
:func:`recorded_factors` returns). This module checks such a source at the statistic's entry,
turns it into a list of layer-gradients objects (tensors become one
:class:`goodfellow.layers.MaterializedGradients`) and lays the per-layer results out again in
the source's own container.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from goodfellow._assembly import require_backward
from goodfellow._autocast import without_autocast
from goodfellow._checks import check_same_kind
from goodfellow.layers.base import MaterializedGradients
from goodfellow.layers.linear import LinearFactors
from goodfellow.transforms import PerExampleGrads, _unpack

Source = object
"""Per-example gradients, materialized or in a layer rule's form (see the module docstring)."""

__all__ = ["recorded_factors"]


@without_autocast
def recorded_factors(recorder: object) -> dict[str, object]:
    """The per-example gradients of every layer a recorder saw in its batch, in each rule's form.

    Reads ``recorder.layers`` of a :class:`goodfellow.PerExampleGradients` after the batch's
    backward: each layer's inputs and output gradients (all calls of the layer), handed to the
    layer's rule, which keeps them in the form that is cheapest for its kind (a Linear's
    :class:`goodfellow.LinearFactors`, a convolution's unfolded factors, an Embedding's token
    ids; :mod:`goodfellow.layers`); nothing ``(n, P)`` is formed here. Statistics computed from
    the result are dicts keyed like
    ``model.named_parameters()`` (``"fc1.weight"``, ``"fc1.bias"``, ...), ready for
    :func:`goodfellow.assign_grads`::

        with PerExampleGradients(model, loss_reduction="mean") as pe:
            F.cross_entropy(model(x), y).backward()
        assign_grads(model, clipped_mean(recorded_factors(pe), max_norm=1.0))

    Args:
        recorder: A :class:`goodfellow.PerExampleGradients` that recorded a forward and a
            backward.

    Returns:
        Module name to that module's gradients in its rule's form, for every recorded module
        with a trainable parameter, in the order of ``model.named_modules()``. A frozen
        parameter (a frozen bias, say) is left out of its layer's results.

    Raises:
        TypeError: If ``recorder`` has no ``layers`` dict of records.
        ValueError: If a Linear's or convolution's weight is frozen while its bias is
            trained, or its weight is shared by several modules (use ``recorder.grads`` for
            those).
        RuntimeError: If no forward and backward were recorded for the batch.
    """
    require_backward(_recorder_with_batch(recorder))
    factors = {name: record_factors(record) for name, record in factored_records(recorder)}
    if not factors:
        raise ValueError("the recorder holds no layer with a trainable weight.")
    return factors


def _recorder_with_batch(recorder: object) -> object:
    """``recorder`` itself, once it is known to hold a batch's records."""
    layers = getattr(recorder, "layers", None)
    if not isinstance(layers, Mapping):
        raise TypeError(
            "recorder must be a goodfellow.PerExampleGradients that recorded a batch, got "
            f"{type(recorder).__name__}."
        )
    if getattr(recorder, "batch_size", None) is None:
        raise RuntimeError(
            "the recorder holds no batch: run the forward and loss.backward() inside "
            "`with PerExampleGradients(model) as pe:` first."
        )
    return recorder


def factored_records(recorder: object) -> list[tuple[str, object]]:
    """The records :func:`recorded_factors` turns into factors, checked before any is read.

    Checks only what the forward decided (frozen and shared weights), so that it can run
    before the backward (``PerExampleGradients.backward_with_norms``).
    """
    records = []
    recorder = _recorder_with_batch(recorder)
    for name, record in recorder.layers.items():
        module = record.module
        suffixes = record.rule.parameter_names(module)
        if not suffixes:
            continue  # frozen: nothing to report
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            if not module.weight.requires_grad:
                raise ValueError(
                    f"{type(module).__name__} {name!r} has a frozen weight but a trainable bias, "
                    "which the factored form does not cover; use recorder.grads."
                )
        for suffix in suffixes:
            # a parameter two layers use (an embedding tied to the output layer): each layer's
            # factors hold one part of its gradient, and the norms would miss the cross terms
            owners = recorder._owners.get(recorder._param_names.get((name, suffix)), [])
            if len(owners) > 1 and owners[0][0] is not record:
                raise ValueError(
                    f"{type(module).__name__} {name!r} shares its {suffix} with "
                    f"{owners[0][0].name!r}; the factored form keeps one layer per parameter: "
                    "use recorder.grads."
                )
        records.append((name, record))
    return records


def record_factors(record: object) -> object:
    """One record's gradients in its rule's form, in its parameters' dtype."""
    module = record.module
    layer = record.gradients()
    own = next((p for p in module._parameters.values() if p is not None), None)
    dtype = (own if own is not None else next(module.parameters())).dtype
    if _example_tensor(layer).dtype != dtype and hasattr(layer, "to"):
        layer = layer.to(dtype)  # under autocast: statistics in the parameters' dtype
    return layer


# --------------------------------------------------------------------------------------------
# Sources: checked once here, then only the layer-gradients interface is used
# --------------------------------------------------------------------------------------------


def _is_layer(value: object) -> bool:
    """Whether ``value`` is one layer's gradients in a rule's form (not a plain tensor)."""
    return not isinstance(value, Tensor) and hasattr(value, "sq_norms")


def _is_factored(source: object) -> bool:
    if _is_layer(source):
        return True
    values = list(source.values()) if isinstance(source, Mapping) else source
    if isinstance(values, (list, tuple)) and values:
        kinds = {_is_layer(v) for v in values}
        if kinds == {True, False}:
            raise TypeError(
                "mix of LinearFactors and other entries: pass either per-example gradients "
                "or the factored form of every layer."
            )
        return kinds == {True}
    return False


class _Layout:
    """How per-layer results are laid out for the caller: the container of the source."""

    def __init__(self, source: object, layers: list, keys: list[str] | None) -> None:
        self.tuple = isinstance(source, tuple) and not _is_layer(source)
        self.keys = keys  # module names (dict of layers) or None
        self.dict_of_tensors = isinstance(source, Mapping) and not _is_factored(source)
        self.layers = layers

    def pack(self, per_layer: list[list[Tensor]]) -> PerExampleGrads:
        if self.dict_of_tensors:
            return dict(zip(self.layers[0].names, per_layer[0]))
        if self.keys is None:
            flat = [t for layer in per_layer for t in layer]
            return tuple(flat) if self.tuple else flat
        out: dict[str, Tensor] = {}
        for key, layer, results in zip(self.keys, self.layers, per_layer):
            for suffix, t in zip(layer.names, results):
                out[f"{key}.{suffix}" if key else suffix] = t  # "" is the root module
        return out


def _layers(source: object, allow_empty: bool = False) -> tuple[_Layout, list, int]:
    """Check a source once; return its layout, its layers and the batch size ``n``."""
    if _is_factored(source):
        if _is_layer(source):
            keys, layers = None, [source]
        elif isinstance(source, Mapping):
            keys, layers = list(source.keys()), list(source.values())
        else:
            keys, layers = None, list(source)
        n = _check_layers(layers, allow_empty)
    else:
        tensor_keys, tensors, n = _unpack(source, allow_empty)  # type: ignore[arg-type]
        names = tensor_keys if tensor_keys is not None else [str(k) for k in range(len(tensors))]
        keys, layers = None, [MaterializedGradients(tensors, names)]
    return _Layout(source, layers, keys), layers, n


def _check_layers(layers: Sequence, allow_empty: bool) -> int:
    """The checks of factored sources: LinearFactors built by hand, and one batch overall."""
    for k, layer in enumerate(layers):
        if not isinstance(layer, LinearFactors):
            continue  # built by a rule from recorded tensors
        for name, t in (("inputs", layer.inputs), ("grad_outputs", layer.grad_outputs)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(
                    f"layer {k}: LinearFactors.{name} must be a floating-point torch.Tensor, "
                    f"got {kind}; build the factors with linear_factors."
                )
        A, G, _ = layer
        if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
            raise ValueError(
                f"layer {k}: LinearFactors need inputs (n, T, d_in) and grad_outputs "
                f"(n, T, d_out), got {tuple(A.shape)} and {tuple(G.shape)}; build them with "
                "linear_factors."
            )
        check_same_kind(
            A, f"layer {k}: LinearFactors.inputs", G, "grad_outputs", "use one dtype and device"
        )
    n = layers[0].batch_size
    like = _example_tensor(layers[0])
    for k, layer in enumerate(layers):
        if layer.batch_size != n:
            raise ValueError(
                f"layer {k} holds {layer.batch_size} examples but layer 0 holds {n}: all layers "
                "must come from one batch."
            )
        t = _example_tensor(layer)
        check_same_kind(
            t, f"layer {k}", like, "layer 0", "all layers must share one dtype and device"
        )
    if n == 0 and not allow_empty:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")
    return n


def _example_tensor(layer: object) -> Tensor:
    """A tensor the layer holds, for its dtype and device (never one formed for the purpose)."""
    if isinstance(layer, LinearFactors):
        return layer.inputs
    if isinstance(layer, MaterializedGradients):
        return layer.tensors[0]
    blocks = getattr(layer, "blocks", None)  # attention: linear blocks
    if isinstance(blocks, list) and blocks and isinstance(blocks[0][0], LinearFactors):
        return blocks[0][0].inputs
    for name in ("grad_outputs", "calls"):  # rules keep each example's output gradients
        held = getattr(layer, name, None)
        if isinstance(held, Tensor):
            return held
        if isinstance(held, (list, tuple)) and held:
            first = held[0][-1] if isinstance(held[0], tuple) else held[0]
            if isinstance(first, Tensor):
                return first
    return layer.per_example()[0]


def _batch_size(source: object) -> int:
    """The number of examples of a checked source."""
    return _layers(source)[2]
