"""Which rule claims which module and parameter of a model, found once at ``attach()``.

:class:`goodfellow.PerExampleGradients` walks the model's modules: a module with a layer rule
(:func:`goodfellow.layers.rule_for`) gets a :class:`goodfellow.LayerRecord`; a module with
trainable parameters of its own and no rule gets the ``torch.func`` fallback rule; a rule that
claims its submodules (``nn.MultiheadAttention`` claims ``out_proj``) hides them from the walk;
a module the recorder cannot handle is refused, naming it. Every trainable parameter ends up
claimed by exactly one rule; a parameter shared by several modules (tied weights) is owned by
each of them, under its first name in ``model.named_parameters()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch.nn.modules.batchnorm import _BatchNorm

from goodfellow._checks import refuse_training_batchnorm, refuse_uninitialized
from goodfellow.layers.base import rule_for
from goodfellow.layers.fallback import FallbackRule
from goodfellow.records import LayerRecord

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients


class Claims(NamedTuple):
    """What :func:`claim_modules` found in a model."""

    layers: dict[str, LayerRecord]
    """Module name -> its record, one per module with a rule."""
    batchnorms: list[tuple[str, _BatchNorm]]
    """Every BatchNorm (refused while in training mode, checked at every forward)."""
    owners: dict[str, list[tuple[LayerRecord, str]]]
    """Parameter name -> (record, name within the module) of every module that uses it,
    in the order of ``model.named_parameters()``."""
    param_names: dict[tuple[str, str], str]
    """(module name, name within the module) -> the parameter's name in the model."""


def claim_modules(pe: PerExampleGradients) -> Claims:
    """Find the modules with a layer rule; refuse every one the recorder cannot handle.

    Records that ``pe`` already holds for the same module are kept, so that references users
    hold to them stay valid across re-attaching.

    Raises:
        ValueError: If a rule refuses a module's settings, a module is not initialized, a
            BatchNorm is in training mode or has trainable parameters, or no module has a
            rule. (Any other module with trainable parameters of its own and no rule gets
            the ``torch.func`` fallback rule.)
    """
    layers: dict[str, LayerRecord] = {}
    batchnorms: list[tuple[str, _BatchNorm]] = []
    claimed: list[str] = []  # modules whose rule claims their submodules' parameters
    for name, module in pe.model.named_modules():
        if any(name.startswith(f"{prefix}.") or prefix == "" for prefix in claimed):
            continue  # its parameters belong to the enclosing module's rule
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, _BatchNorm):
            batchnorms.append((name, module))
            refuse_training_batchnorm(name, module)
        rule = rule_for(module)
        if rule is None and not isinstance(module, _BatchNorm):
            if any(p.requires_grad for p in own.values()):
                rule = _FALLBACK  # a custom layer or a bare parameter: torch.func
        if rule is not None:
            if getattr(rule, "claims_submodules", False):
                claimed.append(name)
            rule.check(name, module)
            refuse_uninitialized(name, module, own)
            kept = pe.layers.get(name)
            fits = kept is not None and kept.module is module
            layers[name] = kept if fits else LayerRecord(name, module, rule, pe)
    if not layers:
        raise ValueError(
            f"the model ({type(pe.model).__name__}) has no nn.Linear layer or other "
            "layer with a rule: there is nothing for PerExampleGradients to record."
        )
    owner_of = {id(p): p_name for p_name, p in pe.model.named_parameters()}
    owners: dict[str, list[tuple[LayerRecord, str]]] = {}
    param_names: dict[tuple[str, str], str] = {}
    for record in layers.values():
        params = dict(record.module.named_parameters())
        for suffix in record.rule.parameter_names(record.module):
            p_name = owner_of[id(params[suffix])]
            owners.setdefault(p_name, []).append((record, suffix))
            param_names[(record.name, suffix)] = p_name
    order = {p_name: index for index, p_name in enumerate(owner_of.values())}
    owners = dict(sorted(owners.items(), key=lambda item: order[item[0]]))
    return Claims(layers, batchnorms, owners, param_names)


_FALLBACK = FallbackRule()
