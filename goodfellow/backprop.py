r"""Per-example gradients of linear layers by Goodfellow's trick, and the two references.

For a linear layer :math:`Z = A W^\top + b` applied to a batch, example :math:`i` only touches
row :math:`i` of :math:`A` and :math:`Z`. Its own loss :math:`L_i` therefore has the gradient

.. math::

    \frac{\partial L_i}{\partial W} = G_i A_i^\top, \qquad
    \frac{\partial L_i}{\partial b} = G_i, \qquad
    G_i = \frac{\partial L_i}{\partial Z_i},

an outer product of a ``(d_out,)`` and a ``(d_in,)`` vector. Autograd hands out
:math:`\partial \mathcal{L} / \partial Z` for the batch loss :math:`\mathcal{L}`: with
``reduction="sum"`` (:math:`\mathcal{L} = \sum_i L_i`) its row ``i`` is :math:`G_i`; with
``reduction="mean"`` (:math:`\mathcal{L} = \frac1n \sum_i L_i`) it is :math:`G_i / n`, so it
has to be multiplied by the batch size :math:`n` first. All per-example outer products are then
one batched matrix product, ``einsum("no,ni->noi")``.

The module also holds the two references every result of the package is tested against: the
naive loop (one backward per example) and ``torch.func`` (``vmap(grad(...))``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "LOSS_REDUCTIONS",
    "batch_size_factor",
    "batched_outer",
    "check_layer_lists",
    "goodfellow_backprop",
    "naive_per_example_grads",
    "norm_from_squares",
    "outer_sq_norms",
    "per_example_grads",
    "per_example_norms",
    "torch_func_per_example_grads",
]

LOSS_REDUCTIONS = ("sum", "mean")
"""The reductions of a batch loss that per-example gradients can be recovered from."""

LossFunction = Callable[[Tensor, Tensor], Tensor]


def batch_size_factor(loss_reduction: str, batch_size: int) -> int:
    r"""The factor that turns a row of the batch loss's gradient into an example's own gradient.

    Args:
        loss_reduction: ``"sum"`` (batch loss :math:`\sum_i L_i`) or ``"mean"``
            (:math:`\frac1n \sum_i L_i`).
        batch_size: The number of examples ``n`` the batch loss was reduced over.

    Returns:
        ``1`` for ``"sum"``, ``batch_size`` for ``"mean"``.

    Raises:
        ValueError: For any other ``loss_reduction``.
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}: pass "
            "the reduction the batch loss was computed with (torch losses default to 'mean')."
        )
    return batch_size if loss_reduction == "mean" else 1


def batched_outer(grad_outputs: Tensor, inputs: Tensor, out: Tensor | None = None) -> Tensor:
    r"""Per-example weight gradients of one linear layer: one batched outer product.

    Index letters: ``n`` example, ``t`` position inside an example (absent for plain vectors),
    ``o`` output feature, ``i`` input feature. The result is
    ``einsum("nto,nti->noi", grad_outputs, inputs)``: for inputs of shape ``(n, d_in)`` it is the
    outer product :math:`G_i A_i^\top`; for inputs with extra dimensions ``(n, ..., d_in)`` the
    layer is applied at every position and an example's gradient sums over its positions.

    Args:
        grad_outputs: Gradient w.r.t. the layer's output, shape ``(n, ..., d_out)``.
        inputs: The layer's input, shape ``(n, ..., d_in)`` with the same middle dimensions.
        out: Optional preallocated ``(n, d_out, d_in)`` tensor to write the result into (not
            differentiable; reuse it across calls to avoid allocating ``n * d_out * d_in`` floats).

    Returns:
        Tensor of shape ``(n, d_out, d_in)``.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: If the shapes do not fit (ranks, batch sizes or middle dimensions differ),
            the dtypes or devices differ, or ``out`` has the wrong shape, dtype or device or
            shares memory with an input.
    """
    _check_outer_arguments(grad_outputs, inputs, out)
    n, d_out, d_in = grad_outputs.shape[0], grad_outputs.shape[-1], inputs.shape[-1]
    if grad_outputs.dim() == 2:
        # A broadcast product (n, o, 1) * (n, 1, i) writes each entry exactly once, straight into
        # `out`, at memory bandwidth; bmm with an inner dimension of 1 is about twice as slow on
        # CPU, and einsum allocates. Bit for bit the same numbers: one product per entry.
        left = grad_outputs.unsqueeze(2)  # (n, o, 1)
        right = inputs.unsqueeze(1)  # (n, 1, i)
        if out is None:
            return torch.mul(left, right)  # (n, o, i)
        return torch.mul(left, right, out=out)  # (n, o, i)
    left = grad_outputs.reshape(n, -1, d_out).transpose(1, 2)  # (n, o, t)
    right = inputs.reshape(n, -1, d_in)  # (n, t, i)
    if out is None:
        return torch.bmm(left, right)  # (n, o, i)
    return torch.bmm(left, right, out=out)  # (n, o, i)


def _check_outer_arguments(grad_outputs: Tensor, inputs: Tensor, out: Tensor | None) -> None:
    """Refuse arguments of :func:`batched_outer` that torch would broadcast or reshape silently."""
    for name, t in (("grad_outputs", grad_outputs), ("inputs", inputs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    g_shape, a_shape = tuple(grad_outputs.shape), tuple(inputs.shape)
    # broadcasting (a batch of 1 against n) or a reshape of another batch size into n rows would
    # return a tensor of the right shape holding the wrong numbers
    if grad_outputs.dim() < 2 or g_shape[:-1] != a_shape[:-1]:
        raise ValueError(
            f"grad_outputs of shape {g_shape} and inputs of shape {a_shape} do not fit: they "
            "must be (n, ..., d_out) and (n, ..., d_in) with the same n and the same middle "
            "dimensions (the layer's output gradient and its input, example by example)."
        )
    if grad_outputs.dtype != inputs.dtype or grad_outputs.device != inputs.device:
        raise ValueError(
            f"grad_outputs is {grad_outputs.dtype} on {grad_outputs.device} but inputs is "
            f"{inputs.dtype} on {inputs.device}; cast both to one dtype on one device."
        )
    if out is None:
        return
    shape = (g_shape[0], g_shape[-1], a_shape[-1])
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}.")
    if tuple(out.shape) != shape or out.dtype != inputs.dtype or out.device != inputs.device:
        raise ValueError(
            f"out must be a {inputs.dtype} tensor of shape {shape} on {inputs.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}."
        )
    if _overlap(out, grad_outputs) or _overlap(out, inputs):
        raise ValueError(
            "out shares memory with grad_outputs or inputs; the products would read entries "
            "already overwritten: pass a separate buffer."
        )


def _memory_span(t: Tensor) -> tuple[int, int] | None:
    """First and one-past-last byte a tensor can touch; ``None`` if it touches no real memory."""
    if t.is_meta or t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # (>= 0)
    return start, start + (extent + 1) * t.element_size()


def _overlap(x: Tensor, y: Tensor) -> bool:
    """Whether two tensors may share memory (exact for contiguous ones, cautious otherwise)."""
    span_x, span_y = _memory_span(x), _memory_span(y)
    if span_x is None or span_y is None:
        return False
    return span_x[0] < span_y[1] and span_y[0] < span_x[1] and x.device == y.device


def _aliased_buffer(buffers: Sequence[Tensor], others: Sequence[Tensor] = ()) -> int | None:
    """Index of a buffer that may share memory with another buffer or with one of ``others``.

    One sweep over the memory spans sorted by their start, ``O(m log m)`` for ``m`` tensors
    (``others`` may overlap each other). Data pointers of two devices can coincide, so each
    device is swept on its own.
    """
    by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
    tagged = [*enumerate(buffers), *((-1, t) for t in others)]  # index -1: not a buffer
    for k, t in tagged:
        span = _memory_span(t)
        if span is not None:
            by_device.setdefault(t.device, []).append((*span, k))
    for spans in by_device.values():
        buffer_end, buffer_index, other_end = -1, -1, -1  # furthest ends swept so far
        for begin, end, k in sorted(spans):
            if begin < buffer_end:
                return k if k >= 0 else buffer_index
            if k >= 0 and begin < other_end:
                return k
            if k >= 0:
                buffer_end, buffer_index = end, k
            else:
                other_end = max(other_end, end)
    return None


def check_layer_lists(
    activations: Sequence[Tensor], linear_grads: Sequence[Tensor]
) -> int:
    """Check that two per-layer lists describe one batch through one chain of linear layers.

    Args:
        activations: ``activations[l]`` of shape ``(n, d_l)``.
        linear_grads: ``linear_grads[l]`` of shape ``(n, d_{l+1})``.

    Returns:
        The batch size ``n``.

    Raises:
        TypeError: If the lists or their entries are not lists and tensors.
        ValueError: If their lengths, ranks, dtypes, devices, batch sizes or widths do not fit
            one MLP, or the batch is empty.
    """
    for name, seq in (("activations", activations), ("linear_grads", linear_grads)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{name} must be a list or tuple of tensors, one per linear layer, "
                f"got {type(seq).__name__}."
            )
    if len(activations) != len(linear_grads):
        raise ValueError(
            f"activations and linear_grads must have one entry per linear layer each, got "
            f"{len(activations)} and {len(linear_grads)}."
        )
    if len(activations) == 0:
        raise ValueError("activations and linear_grads are empty: the model has no linear layer.")
    for layer, (a, g) in enumerate(zip(activations, linear_grads), start=1):
        for name, t in (("activations", a), ("linear_grads", g)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{name}[{layer - 1}] (layer {layer}) must be a torch.Tensor, "
                    f"got {type(t).__name__}."
                )
            if t.dim() != 2:
                raise ValueError(
                    f"{name}[{layer - 1}] (layer {layer}) must have shape (n, features), got "
                    f"shape {tuple(t.shape)}; for inputs with extra dimensions use "
                    "goodfellow.PerExampleGradients."
                )
        if a.dtype != g.dtype or a.device != g.device:
            raise ValueError(
                f"layer {layer}: activations is {a.dtype} on {a.device} but linear_grads is "
                f"{g.dtype} on {g.device}; compute both in one dtype on one device."
            )
    n = activations[0].shape[0]
    if n == 0:
        raise ValueError("the batch is empty (n = 0): per-example gradients need an example.")
    for layer, (a, g) in enumerate(zip(activations, linear_grads), start=1):
        if a.shape[0] != n or g.shape[0] != n:
            raise ValueError(
                f"layer {layer}: batch sizes differ (activations {a.shape[0]}, linear_grads "
                f"{g.shape[0]}, but layer 1 has {n}); all tensors must come from one batch."
            )
    for layer in range(1, len(activations)):
        d_out, d_next_in = linear_grads[layer - 1].shape[1], activations[layer].shape[1]
        if d_out != d_next_in:
            raise ValueError(
                f"layer {layer} has {d_out} outputs (linear_grads[{layer - 1}]) but layer "
                f"{layer + 1} has {d_next_in} inputs (activations[{layer}]): the lists do not "
                "describe one chain of layers; pass them in the order the MLP returns them."
            )
    return n


def goodfellow_backprop(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    loss_reduction: str = "sum",
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    r"""Per-example gradients of every weight and bias of an MLP, by Goodfellow's trick.

    The trick is one einsum per layer, ``"no,ni->noi"`` (``n`` example, ``o`` output feature,
    ``i`` input feature): :math:`\partial L_i/\partial W_l = c\,G_{l,i} A_{l-1,i}^\top` and
    :math:`\partial L_i/\partial b_l = c\,G_{l,i}`, with :math:`c = 1` for ``"sum"`` and
    :math:`c = n` for ``"mean"``.

    Args:
        activations: Inputs of the linear layers, ``activations[l]`` of shape ``(n, d_l)``, as
            returned by :class:`goodfellow.MLP`.
        linear_grads: ``torch.autograd.grad(loss, linear_combs)``, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})``. Pass ``create_graph=True`` there to differentiate the result again.
        loss_reduction: How the batch loss was reduced over examples: ``"sum"``
            (:math:`\sum_i L_i`, the per-example gradients sum to the batch gradient) or
            ``"mean"`` (:math:`\frac1n\sum_i L_i`, they average to it).
        out: Optional list of preallocated tensors in the layout of the result; the results are
            written into them (saves the allocation when called every step). Not allowed when
            the result needs to be differentiable.

    Returns:
        ``[gW_1, gb_1, ..., gW_L, gb_L]``: ``gW_l`` of shape ``(n, d_l, d_{l-1})`` (PyTorch's
        ``(out, in)`` layout) and ``gb_l`` of shape ``(n, d_l)``; row ``i`` is the gradient of
        example ``i``'s own loss :math:`L_i`. In the order of ``model.parameters()``. New
        tensors (or those of ``out``), never the inputs themselves.

    Raises:
        TypeError: If the lists or their entries are not lists and tensors.
        ValueError: If their lengths, ranks, batch sizes or widths do not fit one MLP, the batch
            is empty, ``loss_reduction`` is unknown, or ``out`` does not fit the result (count,
            shape, dtype, device, contiguity), shares memory, or is given for a differentiable
            result.
    """
    n = check_layer_lists(activations, linear_grads)
    scale = batch_size_factor(loss_reduction, n)
    if out is not None:
        out = _check_out(out, activations, linear_grads)
    # Without create_graph upstream the linear grads are constants; differentiating the result
    # through the activations alone would give a silently partial second derivative, so the result
    # is made a plain tensor instead (and in-place writes into `out` become legal).
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in linear_grads)
    with torch.set_grad_enabled(differentiable):
        return _outer_products(activations, linear_grads, scale, out)


def _outer_products(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    scale: int,
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    grads: list[Tensor] = []
    for layer, (a, g) in enumerate(zip(activations, linear_grads)):
        g = g * scale if scale != 1 else g  # (n, o): example i's own dL_i/dZ_i
        if out is None:
            grads.append(batched_outer(g, a))  # (n, o, i)
            # a copy, never the caller's tensor: clipping the result in place must not change
            # linear_grads (nor fail on autograd's expanded gradient of a sum)
            grads.append(g if scale != 1 else g.clone())  # (n, o)
        else:
            grads.append(batched_outer(g, a, out=out[2 * layer]))  # (n, o, i)
            grads.append(out[2 * layer + 1].copy_(g))  # (n, o)
    return grads


def _check_out(
    out: Sequence[Tensor], activations: Sequence[Tensor], linear_grads: Sequence[Tensor]
) -> list[Tensor]:
    """Check preallocated output buffers against the shapes goodfellow_backprop will produce."""
    if isinstance(out, Tensor) or not isinstance(out, Sequence):
        raise TypeError(f"out must be a list of tensors, got {type(out).__name__}.")
    if len(out) != 2 * len(activations):
        raise ValueError(
            f"out must hold 2 tensors per layer ({2 * len(activations)}), got {len(out)}."
        )
    if torch.is_grad_enabled() and any(g.requires_grad for g in linear_grads):
        raise ValueError(
            "out= cannot be used when linear_grads require grad (create_graph=True): "
            "in-place writes are not differentiable; drop out= to get a differentiable result."
        )
    n = activations[0].shape[0]
    for layer, (a, g) in enumerate(zip(activations, linear_grads)):
        weight_shape, bias_shape = (n, g.shape[1], a.shape[1]), (n, g.shape[1])
        for k, shape in ((2 * layer, weight_shape), (2 * layer + 1, bias_shape)):
            buffer = out[k]
            if not isinstance(buffer, Tensor):
                raise TypeError(f"out[{k}] must be a tensor, got {type(buffer).__name__}.")
            if tuple(buffer.shape) != shape or buffer.dtype != g.dtype or buffer.device != g.device:
                raise ValueError(
                    f"out[{k}] must be a {g.dtype} tensor of shape {shape} on {g.device}, got "
                    f"{buffer.dtype} {tuple(buffer.shape)} on {buffer.device}."
                )
            if not buffer.is_contiguous():
                raise ValueError(f"out[{k}] must be contiguous.")
    # a buffer written early that another buffer or a later layer's input lives in would
    # silently change numbers written or read afterwards
    aliased = _aliased_buffer(out, [*activations, *linear_grads])
    if aliased is not None:
        raise ValueError(
            f"out[{aliased}] shares memory with another entry of out or with activations or "
            "linear_grads; every result needs a buffer of its own."
        )
    return list(out)


def outer_sq_norms(grad_outputs: Tensor, inputs: Tensor, bias: bool = False) -> Tensor:
    r"""Squared norms of the per-example gradients of one linear layer, without forming them.

    :math:`\|G_i A_i^\top\|_F^2 = \|G_i\|^2 \|A_i\|^2`: the norm of an outer product
    factorizes, so the cost is :math:`O(n (d_{out} + d_{in}))`, not :math:`O(n d_{out} d_{in})`.
    The bias gradient is :math:`G_i` itself, so with it the sum is
    :math:`\|G_i\|^2 (\|A_i\|^2 + 1)`.

    Args:
        grad_outputs: :math:`G`, shape ``(n, d_out)``.
        inputs: :math:`A`, shape ``(n, d_in)``.
        bias: Include the bias gradient's squared norm.

    Returns:
        Tensor of shape ``(n,)``.
    """
    # vecdot(x, x) is each row's squared norm in one kernel
    grad_sq = torch.linalg.vecdot(grad_outputs, grad_outputs)  # (n,)
    input_sq = torch.linalg.vecdot(inputs, inputs)  # (n,)
    return grad_sq * (input_sq + 1) if bias else grad_sq * input_sq


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


def per_example_norms(
    activations: Sequence[Tensor],
    linear_grads: Sequence[Tensor],
    loss_reduction: str = "sum",
) -> Tensor:
    r"""L2 norms of each example's whole gradient, without materializing the gradients.

    The Frobenius norm of an outer product factorizes,
    :math:`\|G_i A_i^\top\|^2 = \|G_i\|^2 \|A_i\|^2`, so with the bias

    .. math::

        \|g_i\|^2 = c^2 \sum_l \|G_{l,i}\|^2 \left(\|A_{l-1,i}\|^2 + 1\right),

    where :math:`G_{l,i}` is row ``i`` of ``linear_grads[l-1]``, :math:`A_{l-1,i}` row ``i`` of
    ``activations[l-1]``, and :math:`c` is :func:`batch_size_factor` (``1`` for ``"sum"``,
    :math:`n` for ``"mean"``). This costs :math:`O(n \sum_l (d_{l-1} + d_l))` instead of the
    :math:`O(nP)` of materializing the gradients.

    Args:
        activations: As for :func:`goodfellow_backprop`, ``activations[l]`` of shape
            ``(n, d_l)``.
        linear_grads: As for :func:`goodfellow_backprop`, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})``.
        loss_reduction: ``"sum"`` or ``"mean"``, as for :func:`goodfellow_backprop`.

    Returns:
        Tensor of shape ``(n,)``: :math:`\|\nabla_\theta L_i\|_2` over all weights and biases.
        Differentiable when ``linear_grads`` were computed with ``create_graph=True`` (with
        derivative 0 at an example whose gradient is 0, as for ``torch.linalg.vector_norm``).
    """
    n = check_layer_lists(activations, linear_grads)
    scale = batch_size_factor(loss_reduction, n)
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in linear_grads)
    with torch.set_grad_enabled(differentiable):
        layer_squares = [outer_sq_norms(g, a, bias=True) for a, g in zip(activations, linear_grads)]
        squared = torch.stack(layer_squares).sum(dim=0)  # (L, n) -> (n,)
        norms = norm_from_squares(squared)  # (n,)
        return norms * scale if scale != 1 else norms


def _model_output(output: Tensor | tuple) -> Tensor:
    """The prediction of a model that may return ``(y, activations, linear_combs)``."""
    return output[0] if isinstance(output, tuple) else output


def _check_model_batch(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a scalar.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets hold different numbers of examples: {inputs.shape[0]} and "
            f"{targets.shape[0]}."
        )
    if inputs.shape[0] == 0:
        raise ValueError("the batch is empty (n = 0): per-example gradients need an example.")


def _check_plain_mean(loss_fn: LossFunction, targets: Tensor) -> None:
    r"""Refuse class-index losses whose ``"mean"`` is not :math:`\frac1n \sum_i L_i`.

    With class weights :math:`w` a cross-entropy or NLL ``"mean"`` divides by
    :math:`\sum_i w_{y_i}`, and with ignored targets by the number of the others; an example's
    own loss is normalized by its own weight or count, so the factor :math:`n` would be wrong.
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return
    if targets.is_floating_point():
        return  # class probabilities: their mean divides by the number of examples
    if loss_fn.weight is not None:
        why = "has class weights, so its mean divides by the sum of the targets' weights"
    elif targets.device.type != "meta" and (targets == loss_fn.ignore_index).any():
        why = (
            f"ignores targets equal to ignore_index={loss_fn.ignore_index}, so its mean "
            "divides by the number of the other targets"
        )
    else:
        return
    raise ValueError(
        f"loss_fn {why}, not by the number of examples n: the per-example gradients cannot be "
        "recovered from it. Use the same loss with reduction='sum' (and divide the result by "
        "what the mean divides by, if that is what you want)."
    )


def _check_trainable(model: nn.Module, trainable: Sequence) -> None:
    if not trainable:
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameter with requires_grad=True, so "
            "there is no gradient to compute; unfreeze the parameters (requires_grad_(True))."
        )


def naive_per_example_grads(
    model: nn.Module, loss_fn: LossFunction, inputs: Tensor, targets: Tensor
) -> list[Tensor]:
    """The reference: one forward and one backward per example.

    Example ``i`` is run alone, as a batch of one, and its loss
    ``L_i = loss_fn(model(inputs[i:i+1]), targets[i:i+1])`` is differentiated with
    ``torch.autograd.grad``. Slow (``n`` backward passes) but obviously right.

    Args:
        model: Any module; if it returns a tuple (like :class:`goodfellow.MLP`) its first entry is
            the prediction.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        inputs: Batch of inputs, shape ``(n, ...)``.
        targets: Batch of targets, shape ``(n, ...)``.

    Returns:
        One tensor per parameter with ``requires_grad``, in the order of
        ``model.parameters()``, of shape ``(n, *param.shape)``.

    Raises:
        TypeError: If ``model`` is not a module or the batch not tensors.
        ValueError: If the batch is empty, inputs and targets hold different numbers of
            examples, or no parameter requires grad.
    """
    _check_model_batch(model, inputs, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    _check_trainable(model, params)
    per_example: list[tuple[Tensor, ...]] = []
    for i in range(inputs.shape[0]):
        prediction = _model_output(model(inputs[i : i + 1]))
        loss_i = loss_fn(prediction, targets[i : i + 1])
        per_example.append(torch.autograd.grad(loss_i, params))
    return [torch.stack(column) for column in zip(*per_example)]


def torch_func_per_example_grads(
    model: nn.Module, loss_fn: LossFunction, inputs: Tensor, targets: Tensor
) -> list[Tensor]:
    """The ``torch.func`` reference: ``vmap`` over examples of ``grad`` of one example's loss.

    Args:
        model: Any module without batch-coupled state; a tuple output's first entry is the
            prediction.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, applied to a batch of one.
        inputs: Batch of inputs, shape ``(n, ...)``.
        targets: Batch of targets, shape ``(n, ...)``.

    Returns:
        One tensor per parameter with ``requires_grad``, in the order of
        ``model.parameters()``, of shape ``(n, *param.shape)``.

    Raises:
        TypeError: If ``model`` is not a module or the batch not tensors.
        ValueError: If the batch is empty, inputs and targets hold different numbers of
            examples, or no parameter requires grad.
    """
    _check_model_batch(model, inputs, targets)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    _check_trainable(model, names)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss_of_one(params: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        prediction = _model_output(functional_call(model, params, (x.unsqueeze(0),)))
        return loss_fn(prediction, target.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    return [grads[name] for name in names]


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_reduction: str | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Per-example gradients of a :class:`goodfellow.MLP` in one call.

    Runs the forward, takes ``torch.autograd.grad`` of the batch loss w.r.t. the linear
    combinations and applies :func:`goodfellow_backprop`.

    Args:
        model: A :class:`goodfellow.MLP` (anything returning ``(y, activations, linear_combs)``).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` over the whole batch.
        inputs: Batch of inputs, shape ``(n, d_0)``.
        targets: Batch of targets, shape ``(n, ...)``.
        loss_reduction: ``"sum"`` or ``"mean"``; by default read off ``loss_fn.reduction``
            (torch's loss modules carry it). A plain function has no such attribute: then it
            must be given, since guessing wrong would scale every gradient by ``n``.
        create_graph: Keep the graph so the result can be differentiated again.

    Returns:
        ``[gW_1, gb_1, ..., gW_L, gb_L]`` as in :func:`goodfellow_backprop`.

    Raises:
        TypeError: If the model does not return ``(y, activations, linear_combs)``, or the
            reduction cannot be read off ``loss_fn``.
        ValueError: If a layer's output does not require grad (forward under
            ``torch.no_grad()``, or frozen parameters), the reduction is unknown or
            contradicts ``loss_fn.reduction``, or
            ``loss_fn`` is a class-weighted ``"mean"`` or ignores some targets (those means are
            not :math:`\frac1n \sum_i L_i`).
    """
    _check_model_batch(model, inputs, targets)
    output = model(inputs)
    if not (isinstance(output, tuple) and len(output) == 3):
        raise TypeError(
            "per_example_grads needs a model whose forward returns (y, activations, "
            "linear_combs), like goodfellow.MLP; for other models use "
            "goodfellow.PerExampleGradients."
        )
    prediction, activations, linear_combs = output
    for layer, z in enumerate(linear_combs, start=1):
        if not z.requires_grad:
            raise ValueError(
                f"the output of linear layer {layer} does not require grad, so autograd cannot "
                "give the loss's gradient w.r.t. it: run per_example_grads with gradients "
                "enabled (not under torch.no_grad() or torch.inference_mode()) on a model "
                "whose parameters are trainable; for a model with frozen layers use "
                "goodfellow.PerExampleGradients."
            )
    if not create_graph:
        activations = [a.detach() for a in activations]
    carried = getattr(loss_fn, "reduction", None)
    if loss_reduction is None:
        loss_reduction = carried
        if loss_reduction is None:
            raise TypeError(
                "cannot tell how loss_fn reduces over the batch: pass loss_reduction='sum' or "
                "'mean' (or use a torch loss module, which carries .reduction)."
            )
    elif carried is not None and carried != loss_reduction:
        raise ValueError(
            f"loss_reduction={loss_reduction!r} contradicts loss_fn.reduction={carried!r}, and "
            "the gradients would be scaled by the wrong factor: drop loss_reduction (it is "
            "read off the loss) or make the two agree."
        )
    if loss_reduction == "mean":
        _check_plain_mean(loss_fn, targets)
    loss = loss_fn(prediction, targets)
    linear_grads = torch.autograd.grad(loss, linear_combs, create_graph=create_graph)
    return goodfellow_backprop(activations, linear_grads, loss_reduction)
