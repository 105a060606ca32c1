"""Checks of the first three tutorials, the per-example gradient by hand.

Tutorial 1 (``01_notation_and_model``), tutorial 2 (``02_naive_loop``) and
tutorial 3 (``03_vectorizing_with_bmm``).

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

import goodfellow
from goodfellow.exercises._common import (
    _CROSS_ENTROPY_SUM,
    _answered,
    _as_tensor,
    _batch,
    _call,
    _compare,
    _compare_lists,
    _mlp,
    _randn,
    _verdict,
    _WrongAnswerError,
)

# -- Tutorial 1 ----------------------------------------------------------------------------------


def check_parameter_count(parameter_count: Callable[[list[int]], int]) -> bool:
    """Check exercise 1.1.

    ``parameter_count(widths)`` is the number of parameters of an MLP.

    Args:
        parameter_count: the student's function of the widths ``[d_0, ..., d_L]``.
    """

    def run() -> None:
        for widths in ([4, 6, 5, 3], [784, 1024, 1024, 10], [7, 1], [3, 9, 2, 8, 5]):
            got = _call(parameter_count, list(widths))
            expected = sum(p.numel() for p in _mlp(widths).parameters())
            if got != expected:
                raise _WrongAnswerError(
                    f"for widths {widths} it returns {got}, the MLP has another count"
                )

    return _verdict("1.1", run)


def check_mean_linear_grads(mean_linear_grads: Callable) -> bool:
    """Check exercise 1.2.

    ``mean_linear_grads(model, x, targets)`` returns the gradients G_l of the
    mean cross-entropy with respect to the linear combinations ``Z_l``.
    """

    def run() -> str:
        model = _mlp([5, 7, 4, 3], seed=3)
        x, targets = _batch(model, 9, seed=4)
        got = _call(mean_linear_grads, model, x, targets)
        y, _, linear_combs = model(x)
        loss = nn.functional.cross_entropy(y, targets, reduction="sum")
        sum_grads = torch.autograd.grad(loss, linear_combs)
        factor = goodfellow.batch_size_factor("mean", len(x))
        _compare_lists(got, [g / factor for g in sum_grads], "your G_l")
        return f"They are the 'sum' gradients divided by n = {factor}."

    return _verdict("1.2", run)


def check_batchnorm_rows(rows_that_changed: Sequence[int]) -> bool:
    """Check exercise 1.3.

    the rows of the BatchNorm output that change when example 2 changes.

    Args:
        rows_that_changed: the student's list of row indices, for a batch of 8.
    """

    def run() -> str:
        _answered(rows_that_changed)
        torch.manual_seed(0)
        layer, norm = nn.Linear(4, 6).double(), nn.BatchNorm1d(6).double().train()
        x = _randn(8, 4, seed=5)
        perturbed = x.clone()
        perturbed[2] += 0.5
        change = (norm(layer(perturbed)) - norm(layer(x))).abs().detach()  # (8, 6)
        expected = torch.nonzero(change.sum(1) > 1e-12).flatten().tolist()
        if sorted(int(r) for r in rows_that_changed) != expected:
            raise _WrongAnswerError(
                "that is not the set of rows that change; run the experiment again"
            )
        return "Every row depends on every example: the examples mix."

    return _verdict("1.3", run)


def check_single_layer_shapes(shapes: dict) -> bool:
    """Check exercise 1.4.

    the shapes of ``goodfellow.MLP(10, [], output_size=1)`` for 32 examples.

    Args:
        shapes: ``{"activations": [...], "linear_combs": [...], "weight": (...), "bias": (...)}``
            with the shape of every tensor in the lists, and of the weight and bias.
    """

    def run() -> str:
        _answered(shapes)
        model = goodfellow.MLP(10, [], output_size=1)
        _, activations, linear_combs = model(torch.randn(32, 10))
        expected = {
            "activations": [tuple(a.shape) for a in activations],
            "linear_combs": [tuple(z.shape) for z in linear_combs],
            "weight": tuple(model.layers[0].weight.shape),
            "bias": tuple(model.layers[0].bias.shape),
        }
        for key, value in expected.items():
            if key not in shapes:
                raise _WrongAnswerError(f"the dict has no entry {key!r}")
            given = shapes[key]
            given = [tuple(s) for s in given] if isinstance(value, list) else tuple(given)
            if given != value:
                raise _WrongAnswerError(f"the shapes given for {key!r} are not right")
        return "One linear layer and no non-linearity: linear regression, with a squared error."

    return _verdict("1.4", run)


# -- Tutorial 2 ----------------------------------------------------------------------------------


def check_epoch_estimate(epoch_seconds: Callable) -> bool:
    """Check exercise 2.1.

    ``epoch_seconds(naive_seconds, naive_batch, plain_seconds, plain_batch,
    epoch_size)`` returns ``(naive_epoch, plain_epoch)``, the estimated seconds per epoch.
    """

    def run() -> None:
        for naive_s, naive_n, plain_s, plain_n, size in (
            (0.5, 256, 0.004, 256, 60_000),
            (2.0, 100, 0.01, 32, 10_000),
        ):
            got = _call(epoch_seconds, naive_s, naive_n, plain_s, plain_n, size)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise _WrongAnswerError("return two numbers: (naive loop, plain training)")
            naive = size * naive_s / naive_n  # the loop's cost is per example
            plain = size / plain_n * plain_s  # one batched pass per batch
            if not math.isclose(float(got[0]), naive, rel_tol=1e-6):
                raise _WrongAnswerError(
                    "the naive loop's estimate is off; its cost grows per example"
                )
            if not math.isclose(float(got[1]), plain, rel_tol=1.0 / (size / plain_n)):
                raise _WrongAnswerError(
                    "the plain training estimate is off; it costs one pass per batch"
                )

    return _verdict("2.1", run)


def check_backward_loop(backward_loop: Callable) -> bool:
    """Check exercise 2.2.

    ``backward_loop(model, x, targets)`` computes the per-example gradients of
    the summed cross-entropy with ``loss_i.backward()`` and ``.grad``.
    """

    def run() -> None:
        model = _mlp([4, 6, 3], seed=7)
        x, targets = _batch(model, 6, seed=8)
        got = _call(backward_loop, model, x, targets)
        expected = goodfellow.naive_per_example_grads(model, _CROSS_ENTROPY_SUM, x, targets)
        if isinstance(got, (list, tuple)) and len(got) == len(expected):
            rows = [_as_tensor(g, "a gradient") for g in got]
            if all(r.shape == e.shape for r, e in zip(rows, expected)):
                if all(
                    torch.allclose(r[1:] - r[:-1], e[1:], atol=1e-9) for r, e in zip(rows, expected)
                ):
                    raise _WrongAnswerError("row i holds g_1 + ... + g_i: .grad accumulates")
                if all(torch.allclose(r, e[-1].expand_as(r)) for r, e in zip(rows, expected)):
                    raise _WrongAnswerError("every row is the last example's gradient: copy .grad")
        _compare_lists(got, expected, "your per-example gradients")

    return _verdict("2.2", run)


def check_mse_example_loss(example_loss: Callable) -> bool:
    """Check exercise 2.3.

    ``example_loss(prediction, target)`` is L_i of ``MSELoss("mean")``, for
    one example's prediction and target of shape ``(d_L,)``.
    """

    def run() -> str:
        mse = nn.MSELoss(reduction="mean")
        predictions, targets = _randn(5, 4, seed=9), _randn(5, 4, seed=10)
        got = torch.stack(
            [
                _as_tensor(_call(example_loss, p, t), "L_i").reshape(())
                for p, t in zip(predictions, targets)
            ]
        )
        expected = torch.stack([mse(p[None], t[None]) for p, t in zip(predictions, targets)])
        _compare(got, expected, "your L_i")
        batch = mse(predictions, targets)
        if not torch.isclose(got.mean(), batch):
            raise _WrongAnswerError("your L_i do not average to the batch loss")
        return "The batch loss is the plain mean of the L_i."

    return _verdict("2.3", run)


def check_losses_and_norms(losses_and_norms: Callable) -> bool:
    """Check exercise 2.4.

    ``losses_and_norms(model, x, targets)`` returns the per-example
    cross-entropy losses and per-example gradient norms, both of shape ``(n,)``.
    """

    def run() -> None:
        model = _mlp([5, 8, 6, 4], seed=11)
        x, targets = _batch(model, 10, seed=12)
        got = _call(losses_and_norms, model, x, targets)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _WrongAnswerError("return two tensors: (losses, norms)")
        y, activations, linear_combs = model(x)
        losses = nn.functional.cross_entropy(y, targets, reduction="none")
        linear_grads = torch.autograd.grad(losses.sum(), linear_combs)
        norms = goodfellow.per_example_norms(activations, linear_grads, "sum")
        _compare(got[0], losses, "your losses")
        _compare(got[1], norms, "your norms")

    return _verdict("2.4", run)


# -- Tutorial 3 ----------------------------------------------------------------------------------


def check_in_out_layout(in_out_grads: Callable) -> bool:
    """Check exercise 3.1.

    ``in_out_grads(inputs, G)`` returns the per-example gradients of W for
    ``Z = A W`` with W of shape ``(d_in, d_out)``: shape ``(n, d_in, d_out)``.
    """

    def run() -> None:
        inputs, G = _randn(7, 5, seed=13), _randn(7, 3, seed=14)
        got = _call(in_out_grads, inputs, G)
        expected = goodfellow.batched_outer(G, inputs).transpose(1, 2)  # (n, d_in, d_out)
        _compare(got, expected, "your gradients")

    return _verdict("3.1", run)


def check_sequence_grads(sequence_grads: Callable) -> bool:
    """Check exercise 3.2.

    ``sequence_grads(G, A)`` returns the per-example weight and bias gradients
    ``((n, d_out, d_in), (n, d_out))`` of a linear layer on ``(n, t, d)`` inputs.
    """

    def run() -> None:
        G, A = _randn(4, 6, 3, seed=15), _randn(4, 6, 5, seed=16)
        got = _call(sequence_grads, G, A)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _WrongAnswerError("return two tensors: (weight gradients, bias gradients)")
        _compare(got[0], goodfellow.batched_outer(G, A), "your weight gradients")
        _compare(got[1], G.sum(1), "your bias gradients")

    return _verdict("3.2", run)


def check_sequence_norms(sequence_norms: Callable) -> bool:
    """Check exercise 3.3.

    ``sequence_norms(G, A)`` returns the norms ``(n,)`` of the per-example
    weight gradients of a layer on ``(n, t, d)`` inputs, without forming the gradients.
    """

    def run() -> str:
        G, A = _randn(5, 4, 3, seed=17), _randn(5, 4, 6, seed=18)
        got = _call(sequence_norms, G, A)
        expected = goodfellow.batched_outer(G, A).flatten(1).norm(dim=1)
        _compare(got, expected, "your norms")
        return "Check that your function never forms an (n, d_out, d_in) tensor."

    return _verdict("3.3", run)


def check_clipped_sum(clipped_sum: Callable) -> bool:
    """Check exercise 3.4.

    ``clipped_sum(activations, linear_grads, max_norm)`` returns, for every
    parameter in the order of ``goodfellow_backprop`` ([W_1, b_1, W_2, ...]), the sum over the
    examples of the gradients clipped to norm ``max_norm``.
    """

    def run() -> None:
        model = _mlp([5, 8, 4], seed=19)
        x, targets = _batch(model, 12, seed=20)
        y, activations, linear_combs = model(x)
        linear_grads = torch.autograd.grad(_CROSS_ENTROPY_SUM(y, targets), linear_combs)
        activations = [a.detach() for a in activations]
        norms = goodfellow.per_example_norms(activations, linear_grads)
        max_norm = norms.median().item()
        got = _call(clipped_sum, activations, linear_grads, max_norm)
        scale = (max_norm / norms).clamp(max=1.0)  # (n,)
        grads = goodfellow.goodfellow_backprop(activations, linear_grads)
        expected = [(scale.view(-1, *[1] * (g.ndim - 1)) * g).sum(0) for g in grads]
        _compare_lists(got, expected, "your clipped sums")

    return _verdict("3.4", run)
