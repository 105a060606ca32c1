r"""The two references every per-example gradient of the package is tested against.

* The **naive loop**: one forward and one backward per example, ``torch.autograd.grad`` of
  :math:`L_i` alone. Obviously right, ``n`` times slower.
* **torch.func**: ``vmap(grad(loss_of_one))``, the model applied to one example at a time inside
  a vectorizing transform. Right for every model that treats examples independently.

Neither knows any layer formula, which is what makes them references.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["naive_per_example_grads", "torch_func_per_example_grads"]

from goodfellow._checks import LossFunction, check_model_batch, check_trainable, model_output


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
    check_model_batch(model, inputs, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    check_trainable(model, params)
    per_example: list[tuple[Tensor, ...]] = []
    for i in range(inputs.shape[0]):
        prediction = model_output(model(inputs[i : i + 1]))
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
    check_model_batch(model, inputs, targets)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    check_trainable(model, names)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss_of_one(params: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        prediction = model_output(functional_call(model, params, (x.unsqueeze(0),)))
        return loss_fn(prediction, target.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)
    return [grads[name] for name in names]
