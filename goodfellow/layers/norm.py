r"""Normalization layers with affine parameters: LayerNorm, GroupNorm, RMSNorm, InstanceNorm.

Each of these normalizes an example with statistics of that example alone (unlike BatchNorm in
training mode, which is refused), then scales and shifts: :math:`Z = \hat x \odot \gamma +
\beta`, with :math:`\gamma, \beta` broadcast over the positions ``t`` that share them. Hence

.. math::

    \frac{\partial L_i}{\partial \gamma} = \sum_t G_{i,t} \odot \hat x_{i,t}, \qquad
    \frac{\partial L_i}{\partial \beta} = \sum_t G_{i,t},

and :math:`\hat x` does not depend on :math:`\gamma, \beta`: it is recomputed from the recorded
input with the module's own ``eps``:

==============================  ===========================================================
``LayerNorm``                   :math:`(x - \mu) / \sqrt{\sigma^2 + \epsilon}` over the
                                trailing ``normalized_shape`` dimensions (biased variance)
``RMSNorm``                     :math:`x / \sqrt{\overline{x^2} + \epsilon}` over them
                                (``eps=None``: the dtype's machine epsilon, as torch does)
``GroupNorm``                   as LayerNorm over each group of channels and all positions;
                                :math:`\gamma, \beta` per channel
``InstanceNorm1d/2d/3d``        as LayerNorm over the positions of each channel; running
                                statistics instead in eval mode with ``track_running_stats``
==============================  ===========================================================

The results are ``(n, C)``-sized, as small as the parameters, so they are materialized.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from goodfellow._checks import display_name
from goodfellow.layers.base import LayerRule, MaterializedGradients, register_rule

__all__ = ["NormRule", "normalized_input"]

_KINDS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)  # fmt: skip


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    r"""The module's :math:`\hat x` for input ``x``: its output before the affine parameters.

    Computed by the same fused kernel as the module's forward, called without weight and bias
    (``native_layer_norm``, ``F.rms_norm``, ``F.group_norm``, ``F.instance_norm``): the same
    numbers, at the cost of one normalization, not of separate mean and variance passes.

    Args:
        module: A LayerNorm, RMSNorm, GroupNorm or InstanceNorm.
        x: Its input, batched: ``(n, ..., *normalized_shape)`` or ``(n, C, *spatial)``.

    Returns:
        Tensor shaped like ``x``.
    """
    if isinstance(module, nn.LayerNorm):
        # A weight of ones: the same numbers bit for bit (x * 1 is exact), and on CPU the kernel
        # with a weight runs about twice as fast as the one without (0.13 against 0.26 ms for
        # (32, 64, 128), 2 cores); F.layer_norm without weight is slower still.
        ones = x.new_ones(module.normalized_shape)
        return torch.native_layer_norm(x, module.normalized_shape, ones, None, module.eps)[0]
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    use_running = not module.training and module.track_running_stats
    return F.instance_norm(
        x,
        module.running_mean if use_running else None,
        module.running_var if use_running else None,
        use_input_stats=not use_running,
        eps=module.eps,
    )


class NormRule(LayerRule):
    """Normalization layers with an affine weight (and bias): ``sum_t G ⊙ x̂`` and ``sum_t G``."""

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse subclasses with their own forward."""
        base = next(c for c in type(module).__mro__ if c in _KINDS)
        if type(module).forward is not base.forward:
            raise ValueError(
                f"module {display_name(name)} ({type(module).__name__}) subclasses "
                f"{base.__name__} with its own forward; the normalization rule handles only "
                f"the plain {base.__name__}."
            )

    def min_input_dim(self, module: nn.Module) -> int:
        """The batch plus the normalized (or channel and spatial) dimensions."""
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return len(module.normalized_shape) + 1
        if isinstance(module, _InstanceNorm):
            return module._get_no_batch_dim() + 1
        return 2

    def gradients(
        self, module: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor]
    ) -> MaterializedGradients:
        """Per-example ``weight`` and ``bias`` gradients summed over positions and calls."""
        names = self.parameter_names(module)
        dtype = (module.weight if module.weight is not None else module.bias).dtype
        totals: dict[str, Tensor] = {}
        for x, g in zip(inputs, grad_outputs):
            x, g = x.to(dtype), g.to(dtype)
            for p_name in names:
                # x-hat is a fresh tensor: multiplied by G in place, no second (n, ..., d) buffer
                value = normalized_input(module, x).mul_(g) if p_name == "weight" else g
                per_example = _sum_positions(module, value)  # (n, *param.shape)
                totals[p_name] = per_example + totals[p_name] if p_name in totals else per_example
        return MaterializedGradients([totals[p] for p in names], names)


def _sum_positions(module: nn.Module, value: Tensor) -> Tensor:
    """Sum ``value`` over every dimension a parameter is broadcast along: ``(n, *param.shape)``."""
    n = value.shape[0]
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        k = len(module.normalized_shape)
        shape = value.shape[value.dim() - k :]  # sizes explicit: -1 is ambiguous when n = 0
        return value.reshape(n, math.prod(value.shape[1 : value.dim() - k]), *shape).sum(dim=1)
    return value.reshape(n, value.shape[1], math.prod(value.shape[2:])).sum(dim=2)  # (n, C)


for _kind in _KINDS:
    register_rule(_kind, NormRule())
