r"""The accounting check of :class:`goodfellow.PerExampleGradients`: do the parts add up?

Summed over the examples, the per-example gradients of a parameter must give the gradient autograd
computed for it, :math:`\sum_i \nabla_\theta L_i = \nabla_\theta \mathcal{L}` up to the
batch-size factor. The recorder sees only the calls of the module that owns the parameter, so the
two differ exactly when the parameter is also used outside that module's forward
(``F.linear(x, layer.weight)`` beside the layer, or another module reading it): then every
example's gradient would silently miss a part. A hook on each recorded parameter keeps the
gradient autograd gives it (``goodfellow._recording.on_parameter_gradient``), and when a module's
per-example gradients are formed, :func:`check_accounted` compares their sum with it and refuses
a difference, on the batches :func:`accounting_due` picks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from goodfellow._checks import describe
from goodfellow.layers.base import sum_discrepancy

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients
    from goodfellow.records import LayerRecord


CHECK_FIRST = 3
"""The first batches after :meth:`PerExampleGradients.attach` whose parameters' gradients are all
checked against their modules' recorded calls (see :func:`check_accounted`)."""
CHECK_EVERY = 10
"""After those, every ``CHECK_EVERY``-th batch is checked."""


def check_accounted(
    recorder: PerExampleGradients, record: LayerRecord, layer: object, scale: int
) -> None:
    """Refuse per-example gradients that do not add up to what autograd gave the parameter.

    The recorded calls of a module account for its parameters' whole gradient unless a
    parameter is also used outside the module's forward (``F.linear(x, layer.weight)``):
    then the recorder would silently return part of each example's gradient.
    """
    if not accounting_due(recorder):
        return
    names = list(getattr(layer, "names", ()))
    full = [recorder._param_names.get((record.name, suffix)) for suffix in names]
    # shared (tied) parameters add up over their owners: checked as a whole elsewhere
    totals = [
        recorder._totals.get(p) if p is not None and len(recorder._owners.get(p, ())) == 1 else None
        for p in full
    ]
    if all(t is None for t in totals):
        return
    if any(t is not None and t.device.type == "meta" for t in totals):
        return  # a shape-only run (device="meta") has no values to compare
    check = getattr(layer, "sum_discrepancy", None)
    with torch.no_grad():
        errors = check(totals, scale) if check is not None else sum_discrepancy(
            layer, totals, scale
        )
    # the least precise dtype involved sets the tolerance (bfloat16 under autocast, also where
    # only the backward ran under it)
    dtypes = {t.dtype for t in totals if t is not None}
    dtypes |= {g.dtype for g in record.grad_outputs if g is not None}
    dtypes |= {recorder._totals_autocast} - {None}
    eps = max(torch.finfo(dtype).eps for dtype in dtypes)
    tolerance = 1e-6 if eps < 1e-10 else 1e-3 if eps < 1e-5 else 5e-2
    failing = [k for k, error in enumerate(errors) if error > tolerance]
    if failing and _rounding_level(recorder, layer, totals, scale, failing):
        return
    for p_name, error in zip(full, errors):
        if error > tolerance:
            raise ValueError(
                f"the per-example gradients of {p_name!r} do not add up to the gradient "
                f"autograd gave it (relative difference {error:.2g}): the parameter is also "
                f"used outside the forward of {describe(record.name, record.module)}, for "
                "instance through F.linear(x, layer.weight) or by another module, and the "
                "recorder sees only the module's own calls. Compute every use through the "
                "module, or register a rule for the module that uses the parameter "
                "(goodfellow.layers.register_rule)."
            )


def _rounding_level(
    recorder: PerExampleGradients, layer: object, totals: list, scale: int, failing: list[int]
) -> bool:
    """Whether every failing parameter's total and per-example sum are rounding noise.

    A normalization whose standardized input is zero for every example (a LayerNorm over one
    feature or over equal features, a GroupNorm of equal values) has a weight gradient of
    exactly zero; autograd's comes out as rounding noise (about 300 eps relative to the
    gradients around it: the standardization divides by ``sqrt(eps_norm)``), and the relative
    difference of two noises is anything. Where both are below ``1024 eps`` (of the
    parameters' dtype) times the largest entry autograd gave any recorded parameter in this
    backward, the parameter's whole gradient is at the rounding level of the batch's, and
    there is nothing a missing use could be told from.
    """
    gradients = [t for t in recorder._totals.values() if t is not None and t.numel()]
    eps = max(torch.finfo(totals[k].dtype).eps for k in failing)
    floor = 1024 * eps * max(float(t.abs().max()) for t in gradients)
    like = next(t for t in totals if t is not None)
    with torch.no_grad():
        sums = layer.weighted_sum(like.new_ones(layer.batch_size))  # (n,) ones: the plain sum
    return all(
        float(totals[k].abs().max()) <= floor and float(sums[k].abs().max()) / scale <= floor
        for k in failing
    )


def accounting_due(recorder: PerExampleGradients) -> bool:
    """Whether this batch is checked: the first ``CHECK_FIRST``, then every ``CHECK_EVERY``-th.

    A parameter used outside its module is a property of the model's code, seen from the
    first batch on; checking every batch would cost a few small products per layer and step.
    """
    batch = recorder._generation - recorder._attached_at
    return batch <= CHECK_FIRST or batch % CHECK_EVERY == 0
