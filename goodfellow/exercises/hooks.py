"""Checks of tutorial 5 (``05_hooks``): hooks and the batch-size factor.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import goodfellow
from goodfellow.exercises._common import (
    _answered,
    _as_tensor,
    _call,
    _compare,
    _compare_lists,
    _generator,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 5 ----------------------------------------------------------------------------------


def check_mse_delta(own_delta: Callable) -> bool:
    """Check exercise 5.1.

    ``own_delta(y_hat, y)`` returns δ_i = dL_i/dŷ_i, shape ``(N, d_out)``,
    where L_i is example i's own ``MSELoss(reduction="mean")``.
    """

    def run() -> str:
        y_hat, y = _randn(10, 3, seed=23), _randn(10, 3, seed=24)
        got = _call(own_delta, y_hat, y)
        leaf = y_hat.clone().requires_grad_()
        mse = nn.MSELoss(reduction="mean")
        own_losses = torch.stack([mse(leaf[i], y[i]) for i in range(len(y))])
        (expected,) = torch.autograd.grad(own_losses.sum(), leaf)
        _compare(got, expected, "your δ_i")
        factor = goodfellow.batch_size_factor("mean", len(y))
        return f"A hook sees δ_i / {factor}: the batch-size factor is still N."

    return _verdict("5.1", run)


def check_sequence_reduction(loss_reduction: str) -> bool:
    """Check exercise 5.2.

    the ``loss_reduction`` to declare for the mean over all n·T positions.

    Args:
        loss_reduction: ``"mean"`` or ``"sum"``.
    """

    def run() -> str:
        _answered(loss_reduction)
        torch.manual_seed(2)
        tagger = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        tokens = _randn(6, 7, 5, seed=25)
        tags = torch.randint(0, 4, (6, 7), generator=_generator(26))

        def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
            return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

        try:
            recorder = goodfellow.PerExampleGradients(tagger, loss_reduction=loss_reduction)
        except (ValueError, TypeError) as error:
            raise _WrongAnswerError(str(error)) from error
        with recorder as pe:
            loss_fn(tagger(tokens), tags).backward()
        reference = goodfellow.torch_func_per_example_grads(tagger, loss_fn, tokens, tags)
        _compare_lists(list(pe.grads.values()), reference, "the recorded gradients")
        return f"The factor is the number of sequences, {pe.layers['0'].scale}, not n·T."

    return _verdict("5.2", run)


def check_first_term_grad(grad_of_first_term: Callable) -> bool:
    """Check exercise 5.3.

    ``grad_of_first_term(model, inputs)`` is the gradient of
    ``model(inputs)[0].square().sum()`` with respect to ``model[0].weight``.
    """

    def run() -> str:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).double()
        inputs = _randn(4, 5, seed=27)
        got = _call(grad_of_first_term, model, inputs)
        (expected,) = torch.autograd.grad(model(inputs)[0].square().sum(), model[0].weight)
        _compare(got, expected, "your gradient")
        changed = inputs.clone()
        changed[1] += 1.0
        moved = (
            (_as_tensor(_call(grad_of_first_term, model, changed), "gradient") - expected)
            .norm()
            .item()
        )
        return f"Changing example 1 moves it by {moved:.3f}: the examples mix."

    return _verdict("5.3", run)


def check_workspace(compute_into: Callable) -> bool:
    """Check exercise 5.4.

    ``compute_into(pe, workspace)`` computes the per-example gradients of an
    attached ``PerExampleGradients`` into ``workspace`` (a dict of tensors, or None on the first
    call) and returns ``(result, workspace)``.
    """

    def run() -> None:
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
        loss_fn = nn.CrossEntropyLoss()
        pe = goodfellow.PerExampleGradients(net, loss_reduction="mean").attach()
        workspace, pointers = None, None
        try:
            for step in range(3):
                x = _randn(5, 4, seed=30 + step)
                y = torch.randint(0, 3, (5,), generator=_generator(40 + step))
                net.zero_grad()
                loss_fn(net(x), y).backward()
                answer = _call(compute_into, pe, workspace)
                if not isinstance(answer, (tuple, list)) or len(answer) != 2:
                    raise _WrongAnswerError("return (result, workspace)")
                result, workspace = answer
                now = {k: v.data_ptr() for k, v in result.items()}
                if pointers is not None and now != pointers:
                    raise _WrongAnswerError(f"step {step}: the results are not in the same memory")
                pointers = now
                reference = goodfellow.torch_func_per_example_grads(net, loss_fn, x, y)
                _compare_lists(list(result.values()), reference, f"step {step}'s gradients")
        finally:
            pe.detach()

    return _verdict("5.4", run)
