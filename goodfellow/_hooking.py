r"""The tensor-hook plumbing of :class:`goodfellow.PerExampleGradients` (:mod:`goodfellow.hooks`).

The recorder puts a forward hook on every module a layer rule claims; the forward hook keeps the
call's input and registers a *tensor hook* on the call's output, which receives
:math:`\partial\mathcal{L}/\partial Z` during the backward. What that needs, written here once:
module hooks that reach the recorder through a weak reference (:class:`ModuleHook`), the tensor to
hook on (:func:`hookable`), the outputs of a tuple-returning module that must not carry a
gradient (:func:`split_output`), the marks on autograd nodes by which
:meth:`PerExampleGradients.backward <goodfellow.PerExampleGradients.backward>` finds the recorded
outputs (:func:`recorded_edges`), and whether a call runs inside ``torch.func`` or inside a
backward (:func:`is_functorch`, :func:`in_backward`, :func:`refuse_recomputation`).

Why tensor hooks and not module backward hooks is told in :mod:`goodfellow.hooks`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from goodfellow._checks import describe

if TYPE_CHECKING:
    from goodfellow.hooks import PerExampleGradients
    from goodfellow.records import LayerRecord


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a recorder's hook becomes in a copy or a pickle of the model: nothing."""


class ModuleHook:
    """A module hook that calls ``function(recorder, *bound, *args)`` through a weak reference.

    The model does not keep the recorder alive (a recorder nobody holds any more is collected
    and its hooks removed), and a ``copy.deepcopy`` or ``torch.save`` of the model gets a hook
    that does nothing instead of one that feeds, or pickles, the original recorder.
    """

    __torch_unserializable__ = True  # torch.save of a parameter: say nothing, save no hook

    def __init__(
        self, owner: PerExampleGradients, function: Callable[..., Any], *bound: Any
    ) -> None:
        self._owner = weakref.ref(owner)
        self._function = function
        self._bound = bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner()
        if owner is None:
            return None
        return self._function(owner, *self._bound, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return (_make_inert, ())

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook


def _make_inert() -> Callable[..., None]:
    return _inert_hook


def remove_all(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def split_output(record: LayerRecord, output: object) -> tuple[object, list[tuple[int, Tensor]]]:
    """The output whose gradient is recorded, and the other outputs that might need a gradient.

    A module returning a tuple (``nn.MultiheadAttention``: the attention output and its
    weights) is recorded through its first element; the others get a hook that refuses a
    backward through them.
    """
    if not isinstance(output, tuple):
        return output, []
    if not output:
        return None, []
    others = [
        (k, t)
        for k, t in enumerate(output[1:], start=1)
        if isinstance(t, Tensor) and t.requires_grad and not is_functorch(t)
    ]
    return output[0], others


def refuse_other_output(
    record: LayerRecord, index: int, generation: int, owner: PerExampleGradients
) -> Callable[[Tensor], None]:
    """A tensor hook on output ``index > 0`` of a tuple: its gradient would be missing."""

    def hook(grad: Tensor) -> None:
        if owner._attached and generation == owner._generation:
            raise ValueError(
                f"output {index} of {describe(record.name, record.module)} "
                "reaches the loss, but PerExampleGradients records only the gradient of its "
                "first output, so the per-example gradients would miss that path. For "
                "nn.MultiheadAttention pass need_weights=False (or use the weights under "
                "torch.no_grad())."
            )

    return hook


RECORDED_OUTPUTS = "goodfellow recorded outputs"
"""Key of an autograd node's ``metadata``: the outputs of it whose gradient a recorder hooks."""


def recorded_edges(loss: Tensor) -> list[GradientEdge]:
    """Where a backward from ``loss`` to every recorded output it reaches can stop.

    The forward hook marks each hooked output's node (``node.metadata``) instead of keeping a
    reference to it, which would keep the graph of a forward nobody differentiates alive.
    Only the deepest recorded outputs are returned, those with no recorded output below them
    in the graph: a backward to them runs through every other recorded output, whose hooks
    fire on the way, and ``torch.autograd.grad`` holds the gradients of the edges it returns
    until it ends, which for all outputs would keep every layer's output gradient alive
    (``goodfellow._norm_stream`` drops them during the backward).
    """
    reaches: dict[object, bool] = {}  # node -> a recorded output at it or below it
    edges, stack = [], [(loss.grad_fn, None)]
    while stack:  # depth first, each node finished after its children
        node, children = stack.pop()
        if children is None:  # entered
            if node is None or node in reaches:
                continue
            reaches[node] = False  # a DAG brings no node back before it is finished
            children = [child for child, _ in node.next_functions if child is not None]
            stack.append((node, children))
            stack.extend((child, None) for child in children if child not in reaches)
            continue
        below = any(reaches[child] for child in children)
        outputs = node.metadata.get(RECORDED_OUTPUTS, ())
        if outputs and not below:
            edges += [GradientEdge(node, nr) for nr in outputs]
        reaches[node] = below or bool(outputs)
    return edges


def is_functorch(tensor: Tensor) -> bool:
    """Whether a tensor lives inside a ``torch.func`` transform (``vmap``, ``grad``)."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(tensor))


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread right now.

    Uses the graph-task id that ``torch.utils.checkpoint`` itself reads (``-1`` outside a
    backward).
    """
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


def refuse_recomputation(record: LayerRecord, module: nn.Module) -> None:
    """Refuse a recorded call that runs during the backward (activation checkpointing)."""
    if in_backward():
        raise ValueError(
            f"{describe(record.name, module)} ran during the backward, "
            "as it does "
            "inside activation checkpointing (torch.utils.checkpoint), which recomputes "
            "the forward then; PerExampleGradients cannot tell such a recomputation "
            "from a new batch. Run the model without checkpointing while recording."
        )


def hookable(output: Tensor) -> Tensor:
    r"""The tensor whose gradient hook survives in-place operations on a Linear's output.

    For inputs with extra dimensions ``nn.Linear`` returns a *view* of a 2-d
    ``(n * ..., d_out)`` result. A hook on such a view is silently dropped when the view is
    later modified in place (``nn.ReLU(inplace=True)``: the view's autograd node is replaced and
    the hook never fires), while a hook on the 2-d base stays on the node that computed it and
    receives
    :math:`\partial\mathcal{L}/\partial Z` as it was before the in-place operation.
    """
    base = output._base if output._is_view() else None
    if base is not None and base.numel() == output.numel() and output.is_contiguous():
        return base  # (n * ..., d_out), same memory as output
    return output
