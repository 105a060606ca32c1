r"""What a layer rule is, the registry the recorder looks rules up in, and materialized gradients.

A **rule** knows one layer kind. The recorder (:class:`goodfellow.PerExampleGradients`) keeps,
for every module a rule claims, the input of each call and the gradient of the batch loss with
respect to that call's output; it knows no formula. After the backward it hands these to the
rule, which returns the layer's per-example gradients in whatever form is cheapest for its kind:
a **layer-gradients** object. Every statistic of :mod:`goodfellow.statistics` is written once
against the methods of such an object:

* ``names``: the parameters it covers, relative to the module (``("weight", "bias")``);
* ``batch_size``: the number of examples ``n``;
* ``per_example()``: one ``(n, *param.shape)`` tensor per name, :math:`g_i` itself;
* ``sq_norms()``: ``(n,)``, :math:`\|g_i\|^2` over the names, without materializing if it can;
* ``weighted_sum(w)``: one ``param.shape`` tensor per name, :math:`\sum_i w_i g_i`;
* ``square_sum()``: one ``param.shape`` tensor per name, :math:`\sum_i g_i \odot g_i`;
* ``kronecker_factors()``: ``(a, delta)`` for KFAC/EKFAC (see :mod:`goodfellow.ekfac`), or
  ``None``.

:class:`MaterializedGradients` is the same interface over tensors that are already formed (the
list of :func:`goodfellow.goodfellow_backprop`, the dict ``PerExampleGradients.grads``), so a
statistic never asks which kind of source it got. Every kind gives squared norms;
:func:`norm_from_squares` turns their sum over layers into the norms, with a derivative that
stays finite where a norm is 0.

A rule for a layer of your own: subclass :class:`LayerRule`, implement :meth:`~LayerRule.gradients`
(and :meth:`~LayerRule.check` for settings it cannot handle), and register it::

    goodfellow.layers.register_rule(MyLayer, MyLayerRule())
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from goodfellow.layers.position_norms import sum_of_squares

__all__ = [
    "CallCapture",
    "LayerRule",
    "MaterializedGradients",
    "norm_from_squares",
    "register_rule",
    "registered_rules",
    "rule_for",
    "sum_discrepancy",
]


def norm_from_squares(squares: Tensor) -> Tensor:
    """Square roots of squared norms, with derivative 0 (not infinity) where a norm is 0.

    ``sqrt`` has an infinite derivative at 0, so an example whose gradient vanishes would turn
    the derivative of every norm-based quantity into NaN. The subgradient 0 is the one
    ``torch.linalg.vector_norm`` uses; the inner ``where`` keeps the NaN out of the backward.

    Args:
        squares: Squared norms, any shape, entries ``>= 0`` (a negative entry, which only
            round-off can produce, gives 0).

    Returns:
        Tensor of the same shape: their square roots.
    """
    if not squares.requires_grad:  # no derivative to protect: two kernels instead of four
        return squares.clamp(min=0).sqrt()  # a round-off negative reads as 0, as below
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, 1.0).sqrt(), 0.0)


class MaterializedGradients:
    r"""Per-example gradients that are already formed, behind the layer-gradients interface.

    Args:
        tensors: One tensor of shape ``(n, *param.shape)`` per parameter.
        names: A name per tensor (the keys of the results).
    """

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str]) -> None:
        self.tensors = list(tensors)
        self.names = tuple(names)

    @property
    def batch_size(self) -> int:
        """The number of examples ``n``."""
        return self.tensors[0].shape[0]

    def per_example(self, out: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """The tensors themselves (copied into ``out`` where a buffer is given)."""
        if out is None:
            return list(self.tensors)
        return [g if b is None else b.copy_(g) for g, b in zip(self.tensors, out)]

    def sq_norms(self) -> Tensor:
        r""":math:`\|g_i\\|^2`, shape ``(n,)``: every row flattened and squared."""
        return sum(sum_of_squares(g) for g in self.tensors)  # (n,)

    def weighted_sum(self, weights: Tensor) -> list[Tensor]:
        r""":math:`\sum_i w_i g_i`: ``einsum("n,n...->...")`` as a vector-matrix product."""
        n = self.batch_size
        return [(weights @ g.reshape(n, math.prod(g.shape[1:]))).reshape(g.shape[1:])
                for g in self.tensors]  # fmt: skip

    def square_sum(self) -> list[Tensor]:
        r""":math:`\sum_i g_i \odot g_i`, one ``param.shape`` tensor per name."""
        return [g.square().sum(dim=0) for g in self.tensors]

    def centered_square_sum(self, mean: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`\sum_i (g_i - m)^2` for a given mean: the two-pass form, no cancellation."""
        return [(g - m).square().sum(dim=0) for g, m in zip(self.tensors, mean)]

    def centered_sq_norm_sum(self, mean: Sequence[Tensor]) -> Tensor:
        r""":math:`\sum_i \|g_i - m\|^2` for a given mean, a scalar."""
        return sum((g - m).square().sum() for g, m in zip(self.tensors, mean))

    def to(self, dtype: torch.dtype) -> MaterializedGradients:
        """The same gradients in another dtype."""
        return MaterializedGradients([g.to(dtype) for g in self.tensors], self.names)

    def kronecker_factors(self) -> None:
        """Materialized gradients carry no Kronecker structure."""
        return None


def sum_discrepancy(layer: object, totals: Sequence[Tensor | None], scale: int) -> list[float]:
    r"""How far :math:`\sum_i g_i` of a layer is from the gradient autograd gave its parameters.

    The per-example gradients of a layer add up to its parameters' batch gradient (times the
    batch-size factor ``scale``) exactly when the recorded calls are every use of the
    parameters. A parameter used elsewhere as well (``F.linear(x, layer.weight)``) receives more
    than the calls account for: its per-example gradients would be partial, silently.

    Args:
        layer: A layer-gradients object.
        totals: The gradient autograd delivered to each of ``layer.names`` in this backward
            (``None`` where none arrived).
        scale: The batch-size factor the per-example gradients carry.

    Returns:
        For each name, ``|sum_i g_i / scale - total|`` relative to the size of the two (``0``
        where there is no total).
    """
    n = layer.batch_size
    like = next(t for t in totals if t is not None)
    sums = layer.weighted_sum(torch.ones(n, dtype=like.dtype, device=like.device))
    out = []
    for summed, total in zip(sums, totals):
        if total is None:
            out.append(0.0)
            continue
        summed = summed.to(total.dtype) / scale
        size = float(summed.abs().sum() + total.abs().sum())
        out.append(float((summed - total).abs().sum()) / size if size > 0 else 0.0)
    return out


class CallCapture(TorchFunctionMode):
    r"""What a rule sees inside one call of its module, beyond the call's input and output.

    A rule whose layer applies its parameters out of reach of any hook
    (``nn.MultiheadAttention``: ``F.linear`` inside a functional) returns one of these from
    :meth:`LayerRule.capture`. The recorder enters it right before the call and leaves it
    right after; a subclass's ``__torch_function__`` sees the ``torch`` functions the call
    runs, keeps what the rule needs, and appends to ``outputs`` the intermediate tensors
    whose gradient it needs. The recorder hooks those as it hooks a layer's output and fills
    ``grad_outputs`` during the backward; the rule gets the capture back with the
    gradients multiplied by the batch-size factor (:meth:`scaled`).

    Attributes:
        outputs: Intermediate tensors to hook; the recorder takes them (:meth:`take_outputs`).
        grad_outputs: :math:`\partial\mathcal L/\partial` each output, ``None`` until the
            backward reaches it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[Tensor] = []
        self.grad_outputs: list[Tensor | None] = []

    def take_outputs(self) -> list[Tensor]:
        """The tensors to hook, forgotten here.

        A capture lives until the next batch (the rule reads it after the backward); an output
        it held would keep that output's memory, and the graph behind it, alive until then.
        """
        outputs, self.outputs = self.outputs, []
        self.grad_outputs = [None] * len(outputs)
        return outputs

    @property
    def complete(self) -> bool:
        """Whether every hooked output received its gradient."""
        return bool(self.grad_outputs) and all(g is not None for g in self.grad_outputs)

    def scaled(self, scale: int) -> CallCapture:
        """A shallow copy with every gradient multiplied by ``scale``."""
        if scale == 1:
            return self
        other = copy.copy(self)
        other.grad_outputs = [None if g is None else g * scale for g in self.grad_outputs]
        return other


class LayerRule:
    """How one layer kind's per-example quantities follow from what the recorder saw of it.

    A rule is stateless; the registry holds one instance per layer kind. Subclasses implement
    :meth:`gradients` and, for settings they refuse, :meth:`check`.
    """

    def check(self, name: str, module: nn.Module) -> None:
        """Refuse a module this rule cannot handle, with a message that says what to do.

        Called once, when the recorder attaches. The default accepts every module.

        Args:
            name: The module's qualified name (for messages).
            module: The module.

        Raises:
            ValueError: If the module's configuration is not supported.
        """

    def min_input_dim(self, module: nn.Module) -> int:
        """The fewest dimensions a batched input has (the batch and the features: 2)."""
        return 2

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        """The module's own trainable parameters this rule computes gradients for."""
        # what named_parameters(recurse=False) yields, without its walk over the submodules
        # (asked for every layer at every step)
        return tuple(
            p_name for p_name, p in module._parameters.items()
            if p is not None and p.requires_grad
        )  # fmt: skip

    def gradients(
        self, module: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor]
    ) -> object:
        r"""The layer's per-example gradients from its recorded calls.

        Args:
            module: The module.
            inputs: The input of every call of the module that reached the loss.
            grad_outputs: Each example's own output gradient for those calls,
                :math:`\partial L_i / \partial Z_i` (already multiplied by the batch-size
                factor), one tensor per call in the order of ``inputs``.

        Returns:
            A layer-gradients object (see the module docstring) covering
            :meth:`parameter_names`.
        """
        raise NotImplementedError

    def capture(self, module: nn.Module) -> CallCapture | None:
        """A :class:`CallCapture` for one call of ``module``; ``None`` (the default): none."""
        return None

    def zeros(self, module: nn.Module, batch_size: int) -> MaterializedGradients:
        """The gradients of a module that took no part in the loss: zeros."""
        names = self.parameter_names(module)
        params = dict(module.named_parameters(recurse=False))
        return MaterializedGradients(
            [params[p].new_zeros((batch_size, *params[p].shape)) for p in names], names
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Make the recorder use ``rule`` for modules of ``module_type`` (and its subclasses).

    A later registration for the same type replaces the earlier one. A subclass is handled by
    the rule of its nearest registered base class, unless it has one of its own.

    Args:
        module_type: A subclass of ``nn.Module``.
        rule: An instance of a :class:`LayerRule` subclass.

    Raises:
        TypeError: If the arguments are not a module class and a rule.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of nn.Module, got {module_type!r}.")
    if not isinstance(rule, LayerRule):
        raise TypeError(
            f"rule must be an instance of goodfellow.layers.LayerRule, got {type(rule).__name__}."
        )
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for the module's class or its nearest base class, else ``None``."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def registered_rules() -> dict[type[nn.Module], LayerRule]:
    """Every registered module class and its rule, in the order of registration."""
    return dict(_RULES)
