r"""The fallback rule: per-example gradients of one module by ``torch.func``, from its record.

For a module that owns trainable parameters but has no rule of its own (a custom layer, a bare
``nn.Parameter`` held by a module), the recorder keeps every call's positional and keyword
arguments and the gradient :math:`G = \partial \mathcal{L} / \partial Z` of the call's output.
If the module treats the examples of a batch independently, example :math:`i`'s gradient of the
module's parameters :math:`\theta` is a vector-Jacobian product of the module alone:

.. math::

    \frac{\partial L_i}{\partial \theta}
    = \sum_c \Big(\frac{\partial Z_{c,i}}{\partial \theta}\Big)^\top G_{c,i}
    = \nabla_\theta \sum_c \langle f_\theta(x_{c,i}),\, G_{c,i} \rangle,

with :math:`f_\theta(x_{c,i})` the module run on example :math:`i` of call :math:`c` as a batch
of one. ``torch.func.vmap`` of ``torch.func.grad`` of that inner product over the examples gives
all :math:`n` at once; the rest of the model is never rerun. The cost is one more forward and
backward of the module; the result is materialized, ``(n, *param.shape)`` per parameter. A
call that ran under ``torch.autocast`` is rerun under the same setting, which the recorder keeps
with the call's arguments (``LayerRecord.gradients``).

Which arguments are batched: every tensor argument whose size along the batch dimension is
``n`` (the batch size of the first argument); other arguments (masks shared by all examples,
flags) go to every example unchanged. A module whose forward mixes examples (a batch
statistic, a sort over the batch) has no per-example gradients, and this rule cannot notice:
register a rule of its own for it, or freeze it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from goodfellow.layers.base import LayerRule, MaterializedGradients

__all__ = ["FallbackRule"]


class FallbackRule(LayerRule):
    """Any module with trainable parameters of its own: ``vmap`` of ``grad`` of the module alone.

    Not registered for a type: the recorder uses it for a module that owns trainable parameters
    and has no registered rule. Subclasses (see :mod:`goodfellow.layers.attention`) set the
    batch dimension and claim the parameters of submodules.
    """

    #: The recorder keeps every call's args and kwargs, not only the first input.
    records_all_inputs = True
    #: Whether the parameters of submodules are claimed too (and submodules not recorded).
    claims_submodules = False

    def batch_dim(self, module: nn.Module) -> int:
        """The dimension of the first argument (and the output) that indexes the examples."""
        return 0

    def min_input_dim(self, module: nn.Module) -> int:
        """A batched input has at least the batch dimension."""
        return self.batch_dim(module) + 1

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        """The module's own trainable parameters (and its submodules' when it claims them)."""
        recurse = self.claims_submodules
        return tuple(p for p, v in module.named_parameters(recurse=recurse) if v.requires_grad)

    def zeros(self, module: nn.Module, batch_size: int) -> MaterializedGradients:
        """Zeros for every claimed parameter of a module that took no part in the loss."""
        params = dict(module.named_parameters())
        names = self.parameter_names(module)
        return MaterializedGradients(
            [params[p].new_zeros((batch_size, *params[p].shape)) for p in names], names
        )

    def gradients(  # type: ignore[override]
        self,
        module: nn.Module,
        inputs: list[Tensor],
        grad_outputs: list[Tensor],
        calls: Sequence[tuple[tuple, dict]] | None = None,
    ) -> MaterializedGradients:
        """``vmap(grad(<f(x_i), G_i>))`` summed over the calls.

        Args:
            module: The module.
            inputs: The first input of every call (used when ``calls`` is not given).
            grad_outputs: Each example's output gradient for those calls, shaped like the
                (first) output, the batch on :meth:`batch_dim`.
            calls: ``(args, kwargs)`` of every call, in the order of ``grad_outputs``.

        Returns:
            :class:`MaterializedGradients` over :meth:`parameter_names`.
        """
        names = self.parameter_names(module)
        all_params = dict(module.named_parameters())
        # a backward with create_graph=True: the results stay functions of the parameters, the
        # inputs and the output gradients (torch.func's grad composes with autograd)
        differentiable = any(g.requires_grad for g in grad_outputs)
        params = {p: all_params[p] if differentiable else all_params[p].detach() for p in names}
        if calls is None:
            calls = [((x,), {}) for x in inputs]
        bd = self.batch_dim(module)
        total: list[Tensor] | None = None
        for (args, kwargs), g in zip(calls, grad_outputs):
            n = g.shape[bd]
            try:
                per_call = _per_example(
                    module, params, args, kwargs, g, bd,
                    lambda k, v, n=n: self.in_dim(module, k, v, n), differentiable,
                )  # fmt: skip
            except RuntimeError as error:  # an operation torch.func cannot batch (nn.RNN's)
                raise RuntimeError(
                    f"{type(module).__name__} has no rule of its own, and the fallback rule's "
                    f"torch.func.vmap over its examples failed ({error}). Register a rule for it "
                    "(goodfellow.layers.register_rule), freeze its parameters, or compute the "
                    "model's per-example gradients by goodfellow.naive_per_example_grads."
                ) from error
            grads = [per_call[p] for p in names]
            total = grads if total is None else [t + u for t, u in zip(total, grads)]
        return MaterializedGradients(total, names)

    def in_dim(self, module: nn.Module, key: str | None, value: object, n: int) -> int | None:
        """The batch dimension of one argument (``key`` ``None`` for a positional one), if any.

        A tensor is batched when its size along :meth:`batch_dim` is ``n``; anything else is
        handed to every example as it is.
        """
        bd = self.batch_dim(module)
        if isinstance(value, Tensor) and value.dim() > bd and value.shape[bd] == n:
            return bd
        return None


def _per_example(
    module: nn.Module,
    params: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    g: Tensor,
    bd: int,
    in_dim: Callable[[str | None, object], int | None],
    differentiable: bool = False,
) -> dict[str, Tensor]:
    """One call's per-example gradients, ``(n, *param.shape)`` per parameter.

    ``differentiable``: keep the graph of the arguments and of ``g`` (else they are detached).
    """
    flat = list(args) + list(kwargs.values())
    keys = list(kwargs)
    # unbatched arguments (shared masks, flags) go through vmap as constants (in_dims None)
    dims = tuple(in_dim(k, v) for k, v in zip(_positional_names(module, len(args)) + keys, flat))

    def inner(p: dict[str, Tensor], g_i: Tensor, *values: object) -> Tensor:
        values = [v if d is None else v.unsqueeze(d) for v, d in zip(values, dims)]
        out = functional_call(
            module, p, tuple(values[: len(args)]), dict(zip(keys, values[len(args) :]))
        )
        out = out[0] if isinstance(out, tuple) else out
        return torch.sum(out * g_i.unsqueeze(bd))  # <f(x_i), G_i>

    fn = vmap(grad(inner), in_dims=(None, bd, *dims))
    # The fused CPU attention kernels have no batching rule, so vmap would run them example by
    # example; the math kernel batches (about 5x faster on attention) and gives the same values.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        if not differentiable:
            g, flat = g.detach(), [v.detach() if isinstance(v, Tensor) else v for v in flat]
        return fn(params, g, *flat)


def _positional_names(module: nn.Module, count: int) -> list[str | None]:
    """The forward's names of the first ``count`` positional arguments (``None`` if unknown)."""
    try:
        names = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        names = []
    return (names + [None] * count)[:count]
