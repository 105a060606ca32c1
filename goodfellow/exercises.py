"""Checks for the tutorials' exercises: right or wrong, without showing the solution.

Every exercise of ``tutorials/NN_*.ipynb`` is followed by a cell that calls one of these
functions with the student's function or answer. A check runs the student's code on random
inputs of its own (float64, fresh shapes, so that a transpose or a lucky broadcast cannot hide),
compares the result with what the library computes, prints a verdict and returns it as a bool.
A wrong answer gets a hint about *what* differs (a shape, a factor, which entries), never the
answer itself. Until the student has written something (the function returns ``None`` or
``...``), the check says so instead of failing.

Not part of ``goodfellow.__all__``: import as ``from goodfellow.exercises import check_...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import goodfellow

_RTOL, _ATOL = 1e-7, 1e-9  # float64: a right answer is far closer than this


class _WrongAnswerError(Exception):
    """The student's answer differs from the library's; the message says how."""


class _NotAnsweredError(Exception):
    """The student has not written an answer yet."""


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)


def _call(function: Callable, *args: Any) -> Any:
    """Run the student's function; None or Ellipsis means "not answered yet"."""
    if function is None or function is Ellipsis:
        raise _NotAnsweredError
    try:
        result = function(*args)
    except NotImplementedError as error:
        raise _NotAnsweredError from error
    except Exception as error:
        raise _WrongAnswerError(f"your function raised {type(error).__name__}: {error}") from error
    if result is None or result is Ellipsis:
        raise _NotAnsweredError
    return result


def _answered(*values: Any) -> None:
    if any(value is None or value is Ellipsis for value in values):
        raise _NotAnsweredError


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise _WrongAnswerError(f"{what} should be a tensor, got {type(value).__name__}") from error


def _compare(got: Any, expected: Tensor, what: str, rtol: float = _RTOL) -> None:
    """Raise _WrongAnswerError, saying how ``got`` differs from ``expected``."""
    got = _as_tensor(got, what)
    expected = expected.detach().to(torch.float64)
    if got.shape != expected.shape:
        raise _WrongAnswerError(
            f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        )
    if not torch.isfinite(got).all():
        raise _WrongAnswerError(f"{what} contains NaN or inf")
    if torch.allclose(got, expected, rtol=rtol, atol=_ATOL):
        return
    hint = ""
    flat_got, flat_expected = got.flatten(), expected.flatten()
    if flat_expected.abs().max() > 0 and flat_got.abs().max() > 0:
        ratio = flat_got.dot(flat_expected) / flat_expected.dot(flat_expected)
        if torch.allclose(got, ratio * expected, rtol=1e-6, atol=_ATOL):
            hint = f" (it is {ratio.item():.4g} times the right value: a missing factor?)"
    if got.ndim >= 2 and got.shape[-1] == got.shape[-2]:
        if torch.allclose(got.transpose(-1, -2), expected, rtol=rtol, atol=_ATOL):
            hint = " (it is the transpose of the right value)"
    wrong = (~torch.isclose(got, expected, rtol=rtol, atol=_ATOL)).double().mean().item()
    raise _WrongAnswerError(
        f"{what} differs from the library's in {100 * wrong:.0f}% of its entries{hint}"
    )


def _compare_lists(got: Any, expected: Sequence[Tensor], what: str, rtol: float = _RTOL) -> None:
    if isinstance(got, Tensor) or not isinstance(got, (list, tuple)):
        raise _WrongAnswerError(f"{what} should be a list of {len(expected)} tensors")
    if len(got) != len(expected):
        raise _WrongAnswerError(f"{what} has {len(got)} entries, expected {len(expected)}")
    for index, (a, b) in enumerate(zip(got, expected)):
        _compare(a, b, f"{what}[{index}]", rtol)


def _verdict(exercise: str, run: Callable[[], str | None]) -> bool:
    """Print the verdict of ``run`` (which may raise _WrongAnswerError or _NotAnsweredError)."""
    try:
        note = run()
    except _NotAnsweredError:
        print(f"Exercise {exercise}: not answered yet. Write your answer and run this cell again.")
        return False
    except _WrongAnswerError as error:
        print(f"Exercise {exercise}: not right yet: {error}.")
        return False
    except Exception as error:  # an answer of an unexpected kind: say so, do not crash the cell
        print(
            f"Exercise {exercise}: not right yet: the answer could not be checked "
            f"({type(error).__name__}: {error})."
        )
        return False
    print(f"Exercise {exercise}: right." + (f" {note}" if note else ""))
    return True


def _mlp(widths: Sequence[int], seed: int = 0, activation: Callable = torch.relu) -> nn.Module:
    torch.manual_seed(seed)
    model = goodfellow.MLP(widths[0], list(widths[1:-1]), widths[-1], activation=activation)
    return model.double()


def _batch(model: nn.Module, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    x = _randn(n, model.input_size, seed=seed)
    targets = torch.randint(0, model.output_size, (n,), generator=_generator(seed + 1))
    return x, targets


_CROSS_ENTROPY_SUM = nn.CrossEntropyLoss(reduction="sum")

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


# -- Tutorial 4 ----------------------------------------------------------------------------------


def check_validation_errors(errors: dict) -> bool:
    """Check exercise 4.1.

    the largest relative errors against the naive loop, in float64.

    Args:
        errors: ``{"goodfellow": ..., "torch.func": ...}``, the largest relative error the
            student found for each route.
    """

    def run() -> str:
        _answered(errors)
        for route in ("goodfellow", "torch.func"):
            if route not in errors:
                raise _WrongAnswerError(f"no entry for {route!r}")
            value = float(errors[route])
            if not math.isfinite(value) or value < 0:
                raise _WrongAnswerError(f"the error of {route!r} is not a non-negative number")
            if value > 1e-10:
                raise _WrongAnswerError(
                    f"{route!r}: {value:.1e} is far above float64 round-off; check the dtype "
                    "of model and data, and the loss_reduction"
                )
        return "Both routes agree with the naive loop to round-off."

    return _verdict("4.1", run)


def check_time_split(to_linear_grads: Callable, outer_products: Callable) -> bool:
    """Check exercise 4.2.

    the two timed parts compose to the per-example gradients.

    Args:
        to_linear_grads: ``to_linear_grads(model, x, labels)`` returns ``(activations,
            linear_grads)`` for the mean cross-entropy.
        outer_products: ``outer_products(activations, linear_grads)`` returns the per-example
            gradients.
    """

    def run() -> str:
        model = _mlp([6, 9, 4], seed=21)
        x, labels = _batch(model, 8, seed=22)
        parts = _call(to_linear_grads, model, x, labels)
        if not isinstance(parts, (tuple, list)) or len(parts) != 2:
            raise _WrongAnswerError("to_linear_grads should return (activations, linear_grads)")
        got = _call(outer_products, *parts)
        expected = goodfellow.naive_per_example_grads(model, nn.CrossEntropyLoss(), x, labels)
        _compare_lists(got, expected, "the per-example gradients of your two parts")
        return "The split is right; now compare the times."

    return _verdict("4.2", run)


def check_reproduced_bugs(
    no_factor: Sequence[Tensor],
    transposed: Sequence[Tensor],
    truth: Sequence[Tensor],
    batch_size: int,
    square_index: int = 2,
) -> bool:
    """Check exercise 4.3.

    the two bugs of tutorial 3, reproduced on purpose.

    Args:
        no_factor: per-example gradients computed without the factor n.
        transposed: per-example gradients with the square layer's weight transposed.
        truth: the right per-example gradients.
        batch_size: n.
        square_index: the position of the square weight in the lists.
    """

    def run() -> None:
        _answered(no_factor, transposed)
        _compare_lists(
            no_factor, [t / batch_size for t in truth], "your 'no factor' gradients", rtol=1e-6
        )
        expected = [t.transpose(1, 2) if k == square_index else t for k, t in enumerate(truth)]
        _compare_lists(transposed, expected, "your 'transposed' gradients", rtol=1e-6)

    return _verdict("4.3", run)


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


# -- Tutorial 6 ----------------------------------------------------------------------------------


def check_one_example_fisher(one_example_fisher: Callable) -> bool:
    """Check exercise 6.1.

    ``one_example_fisher(a_bar, delta)`` returns the empirical Fisher
    ``(P, P)`` of one example from its ``ā (1, d_in + 1)`` and ``δ (1, d_out)``, built from the
    per-example gradient ``δ āᵀ``.
    """

    def run() -> str:
        a_bar, delta = _randn(1, 4, seed=50), _randn(1, 3, seed=51)
        got = _call(one_example_fisher, a_bar, delta)
        A, G = goodfellow.kfac_factors(a_bar, delta)
        _compare(got, torch.kron(G, A), "your Fisher")
        return "It equals KFAC's G ⊗ A: for one example the approximation is exact."

    return _verdict("6.1", run)


def check_factored_damping(factored_step: Callable) -> bool:
    """Check exercise 6.2.

    ``factored_step(g_hat, A, G, damping)`` returns
    ``(G + γI)⁻¹ ĝ (A + γI)⁻¹`` with γ = √damping, shape of ``g_hat``.
    """

    def run() -> None:
        a_bar, delta = _randn(20, 4, seed=52), _randn(20, 3, seed=53)
        A, G = goodfellow.kfac_factors(a_bar, delta)
        g_hat, damping = _randn(3, 4, seed=54), 0.1
        got = _call(factored_step, g_hat, A, G, damping)
        gamma = damping**0.5
        kron = torch.kron(
            G + gamma * torch.eye(3, dtype=G.dtype), A + gamma * torch.eye(4, dtype=A.dtype)
        )
        expected = torch.linalg.solve(kron, g_hat.flatten()).reshape(3, 4)
        _compare(got, expected, "your step")

    return _verdict("6.2", run)


def check_best_diagonal(best_diagonal: Callable) -> bool:
    """Check exercise 6.3.

    ``best_diagonal(F, Q)`` returns the vector S (P,) for which
    ``Q diag(S) Qᵀ`` is closest to ``F`` in Frobenius norm.
    """

    def run() -> None:
        g = _randn(30, 6, seed=55)
        F = g.T @ g / 30  # (6, 6), an empirical Fisher
        Q = torch.linalg.qr(_randn(6, 6, seed=56)).Q
        got = _call(best_diagonal, F, Q)
        _compare(got, torch.diagonal(Q.T @ F @ Q), "your diagonal")

    return _verdict("6.3", run)


def check_sum_learning_rate(learning_rate: float, batch_size: int = 64) -> bool:
    """Check exercise 6.4.

    the learning rate that makes EKFAC on a summed loss take the steps of
    η = 0.03 on the mean loss.
    """

    def run() -> None:
        _answered(learning_rate)

        def train(reduction: str, lr: float) -> Tensor:
            torch.manual_seed(4)
            net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
            optimizer = goodfellow.EKFAC(net, lr=lr, damping=1e-3, loss_reduction=reduction)
            for step in range(3):
                x = _randn(batch_size, 5, seed=60 + step)
                y = torch.randint(0, 3, (batch_size,), generator=_generator(70 + step))
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y, reduction=reduction).backward()
                optimizer.step()
            optimizer.remove_hooks()
            return torch.cat([p.detach().flatten() for p in net.parameters()])

        try:
            lr = float(learning_rate)
        except (TypeError, ValueError) as error:
            raise _WrongAnswerError("give the learning rate as a number") from error
        if not torch.allclose(train("sum", lr), train("mean", 0.03), rtol=1e-6, atol=1e-9):
            raise _WrongAnswerError("with that learning rate the trajectories differ")

    return _verdict("6.4", run)


# -- Tutorial 7 ----------------------------------------------------------------------------------


def check_linear_transform(mean_of_linear: Callable) -> bool:
    """Check exercise 7.1.

    ``mean_of_linear(grads, M)`` returns E_i[M g_i] as one vector (P,), for
    per-example gradients ``grads`` (a list of ``(n, ...)`` tensors) and a ``(P, P)`` matrix M.
    """

    def run() -> str:
        grads = [_randn(6, 2, 3, seed=80), _randn(6, 2, seed=81)]
        M = _randn(8, 8, seed=82)
        got = _call(mean_of_linear, grads, M)
        got = (
            torch.cat([_as_tensor(t, "E[Mg]").flatten() for t in got])
            if isinstance(got, (list, tuple))
            else got
        )
        mean = torch.cat([g.mean(0).flatten() for g in grads])
        _compare(got, M @ mean, "your E[M g]")
        return "It equals M E[g]: for a linear T the order does not matter."

    return _verdict("7.1", run)


def check_cabs_first_batch(without_correction: int, with_correction: int) -> bool:
    """Check exercise 7.2.

    the batch size after the first step, without and with bias correction.
    """

    def run() -> None:
        _answered(without_correction, with_correction)
        p = nn.Parameter(torch.zeros(2))
        cabs = goodfellow.CABS([p], lr=1.0, bounds=(1, 10**6))
        grads = [torch.tensor([[4.0, 0.0], [0.0, 0.0]])]  # tr Σ = 4 with the 1/n estimate
        expected_plain = cabs.step(torch.tensor([2.0, 2.0]), grads)
        xi, loss = 0.05 * 4.0, 0.95 * 1.0 + 0.05 * 2.0  # the running averages after one step
        corrected = math.ceil((xi / 0.05) / ((loss - 0.95) / 0.05))
        if int(without_correction) != expected_plain:
            raise _WrongAnswerError("the batch size without correction is not right")
        if int(with_correction) != corrected:
            raise _WrongAnswerError("the batch size with bias correction is not right")

    return _verdict("7.2", run)


def check_cabs_learning_rate_factor(factor: float) -> bool:
    """Check exercise 7.3.

    by what factor CABS's batch size grows when the learning rate doubles.
    """

    def run() -> None:
        _answered(factor)
        sizes = []
        for lr in (0.5, 1.0):
            p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
            cabs = goodfellow.CABS([p], lr=lr, bounds=(1, 10**9), rounding="round")
            grads = [1e4 * _randn(8, 3, seed=83)]
            sizes.append(cabs.step(torch.full((8,), 2.0), grads))
        if not math.isclose(float(factor), sizes[1] / sizes[0], rel_tol=0.01):
            raise _WrongAnswerError("that is not how the rule scales with the learning rate")

    return _verdict("7.3", run)


def check_second_moment(second_moment: Callable) -> bool:
    """Check exercise 7.4.

    ``second_moment(A, G)`` returns the entrywise second moment
    ``(d_out, d_in)`` of the per-example weight gradients for inputs ``(n, T, d_in)``.
    """

    def run() -> None:
        A, G = _randn(5, 3, 4, seed=84), _randn(5, 3, 2, seed=85)
        got = _call(second_moment, A, G)
        layer = goodfellow.linear_factors(A, G, bias=False)
        _compare(got, goodfellow.gradient_second_moment(layer)[0], "your second moment")

    return _verdict("7.4", run)


# -- Tutorial 8 ----------------------------------------------------------------------------------


def check_best_step(best_step: Callable) -> bool:
    """Check exercise 8.1.

    ``best_step(c, u, f_norm, q)`` returns the ε that minimizes the error model
    ``c ε^q + u f_norm / ε``.
    """

    def run() -> None:
        for c, u, f_norm, q in ((1.0, 1.1e-16, 1.0, 1), (0.3, 6e-8, 2.0, 2), (5.0, 1e-16, 0.5, 2)):
            got = float(_call(best_step, c, u, f_norm, q))
            grid = torch.logspace(-12, 0, 200_001, dtype=torch.float64)
            error = c * grid**q + u * f_norm / grid
            expected = grid[error.argmin()].item()
            if not math.isclose(got, expected, rel_tol=1e-3):
                raise _WrongAnswerError(f"for q = {q} the step does not minimize the error model")

    return _verdict("8.1", run)


def check_broyden_update(broyden_update: Callable) -> bool:
    """Check exercise 8.2.

    ``broyden_update(J, dx, df)`` returns the corrected Jacobian estimate.
    """

    def run() -> str:
        J, dx, df = _randn(4, 6, seed=86), _randn(6, seed=87), _randn(4, seed=88)
        got = _call(broyden_update, J.clone(), dx, df)
        _compare(got, J + torch.outer(df - J @ dx, dx) / dx.dot(dx), "your update")
        if not torch.allclose(_as_tensor(got, "J") @ dx, df):
            raise _WrongAnswerError("the result does not satisfy the secant condition J dx = df")
        return "It satisfies the new secant condition and changes J as little as possible."

    return _verdict("8.2", run)


def check_noise_prediction(predicted_error: Callable) -> bool:
    """Check exercise 8.3.

    ``predicted_error(m, p, sigma, eps, k)`` is the expected squared error of
    ``estimate_jacobian`` with central differences on a noisy linear map.
    """

    def run() -> str:
        m, p, sigma, eps, k, draws = 4, 3, 1e-6, 1e-3, 4, 300
        got = float(_call(predicted_error, m, p, sigma, eps, k))
        A = _randn(p, m, seed=89)
        x = _randn(m, seed=90)
        noise = _generator(91)

        def noisy(v: Tensor) -> Tensor:
            xi = torch.randn(*v.shape[:-1], p, dtype=torch.float64, generator=noise)
            return v @ A.T + sigma * xi

        errors = [
            (goodfellow.estimate_jacobian(noisy, x, k, eps, generator=_generator(seed)) - A)
            .square()
            .sum()
            .item()
            for seed in range(draws)
        ]
        measured = sum(errors) / draws
        if not math.isclose(got, measured, rel_tol=0.25):
            raise _WrongAnswerError(
                f"your prediction is {got / measured:.2f} times the measured mean"
            )
        return f"Measured over {draws} draws: {measured:.3g}."

    return _verdict("8.3", run)


# -- Tutorial 10 ---------------------------------------------------------------------------------


def check_embedding_sq_norms(embedding_sq_norms: Callable) -> bool:
    """Check exercise 10.1.

    ``embedding_sq_norms(tokens, G, padding_idx)`` returns the squared norms ``(n,)`` of the
    per-example gradients of an ``nn.Embedding``'s weight, from the ids ``(n, T)`` and the output
    gradients ``(n, T, d)``; positions holding ``padding_idx`` (an id or None) contribute nothing.
    """

    def run() -> None:
        vocabulary, n, T, d = 7, 5, 6, 3
        tokens = torch.randint(0, vocabulary, (n, T), generator=_generator(100))
        G = _randn(n, T, d, seed=101)
        for padding_idx in (None, 2):
            got = _call(embedding_sq_norms, tokens, G, padding_idx)
            embedding = nn.Embedding(vocabulary, d, padding_idx=padding_idx).double()
            expected = []
            for i in range(n):  # each example's gradient by autograd, then its norm
                (grad,) = torch.autograd.grad((embedding(tokens[i]) * G[i]).sum(), embedding.weight)
                expected.append(grad.square().sum())
            _compare(got, torch.stack(expected), f"your norms (padding_idx={padding_idx})")

    return _verdict("10.1", run)


def check_layernorm_grads(layernorm_grads: Callable) -> bool:
    """Check exercise 10.2.

    ``layernorm_grads(ln, x, G)`` returns the per-example gradients ``(weight, bias)``, each
    ``(n, d)``, of an ``nn.LayerNorm(d)`` from its input and output gradient ``(n, T, d)``.
    """

    def run() -> None:
        n, T, d = 4, 5, 6
        ln = nn.LayerNorm(d, eps=1e-3).double()  # an epsilon of its own, not the default
        with torch.no_grad():
            ln.weight.copy_(_randn(d, seed=102))
            ln.bias.copy_(_randn(d, seed=103))
        x, G = _randn(n, T, d, seed=104), _randn(n, T, d, seed=105)
        got = _call(layernorm_grads, ln, x, G)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _WrongAnswerError("return two tensors: (weight gradients, bias gradients)")
        weights, biases = [], []
        for i in range(n):
            gw, gb = torch.autograd.grad((ln(x[i]) * G[i]).sum(), [ln.weight, ln.bias])
            weights.append(gw)
            biases.append(gb)
        _compare(got[0], torch.stack(weights), "your weight gradients")
        _compare(got[1], torch.stack(biases), "your bias gradients")

    return _verdict("10.2", run)


def check_largest_gram_length(largest_gram_length: Callable) -> bool:
    """Check exercise 10.3.

    ``largest_gram_length(d_in, d_out)`` is the largest T for which the Gram form,
    ``T² (d_in + d_out)`` per example, costs no more than forming the gradient,
    ``T d_in d_out``: the rule ``goodfellow.gradient_norms`` applies to a Linear layer.
    """

    def run() -> None:
        for d_in, d_out in ((128, 128), (128, 512), (512, 128), (128, 96), (3, 5), (1, 1)):
            got = _call(largest_gram_length, d_in, d_out)
            expected = max(
                t for t in range(0, d_in * d_out + 1) if t * (d_in + d_out) <= d_in * d_out
            )
            if got != expected:
                raise _WrongAnswerError(f"for d_in = {d_in}, d_out = {d_out} the answer is off")

    return _verdict("10.3", run)


# -- Tutorial 11 ---------------------------------------------------------------------------------


def check_removal_shifts(removal_shifts: Callable) -> bool:
    """Check exercise 11.1.

    ``removal_shifts(grads, max_norm)`` returns, for per-example gradients ``grads`` (a dict of
    ``(n, *shape)`` tensors), the norms ``(n,)`` of the change of the clipped sum when each
    example in turn is removed.
    """

    def run() -> str:
        grads = {"weight": _randn(6, 3, 4, seed=106), "bias": _randn(6, 3, seed=107)}
        norms = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
        max_norm = norms.median().item()
        got = _call(removal_shifts, grads, max_norm)
        _compare(got, norms.clamp(max=max_norm), "your shifts", rtol=1e-6)
        return "Removing one example moves the clipped sum by at most C."

    return _verdict("11.1", run)


def _opacus_accountants() -> Any:
    try:
        from opacus import accountants
    except ImportError as error:  # pragma: no cover - the tutorial needs Opacus anyway
        raise _WrongAnswerError("this check needs Opacus (pip install opacus)") from error
    return accountants


def check_update_noise(update_noise: Callable) -> bool:
    """Check exercise 11.2.

    ``update_noise(sample_rate)`` is the noise per entry of the update, ``σ C / (q N)``, with σ
    chosen by Opacus' RDP accountant for ε = 2 at δ = 1e-5 over 15 epochs, N = 1440, C = 1.
    """

    def run() -> str:
        accountants = _opacus_accountants()
        noises = {}
        for rate in (1 / 24, 1 / 6):
            got = float(_call(update_noise, rate))
            sigma = accountants.utils.get_noise_multiplier(
                target_epsilon=2.0,
                target_delta=1e-5,
                sample_rate=rate,
                steps=round(15 / rate),
                accountant="rdp",
            )
            expected = sigma * 1.0 / (rate * 1440)
            if not math.isclose(got, expected, rel_tol=1e-6):
                raise _WrongAnswerError(f"for q = 1/{round(1 / rate)} the noise is off")
            noises[rate] = expected
        better = "1/6" if noises[1 / 6] < noises[1 / 24] else "1/24"
        return f"The less noisy update comes with q = {better}."

    return _verdict("11.2", run)


def check_two_epsilons(two_epsilons: Callable) -> bool:
    """Check exercise 11.3.

    ``two_epsilons(sigma, sample_rate, steps)`` returns ``(ε of the RDP accountant, ε of the PRV
    accountant)`` at δ = 1e-5 for the same history.
    """

    def run() -> None:
        accountants = _opacus_accountants()
        for sigma, rate, steps in ((1.0, 1 / 24, 360), (2.0, 1 / 6, 90)):
            got = _call(two_epsilons, sigma, rate, steps)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise _WrongAnswerError("return two numbers: (RDP epsilon, PRV epsilon)")
            for name, kind, value in (
                ("RDP", accountants.RDPAccountant, got[0]),
                ("PRV", accountants.PRVAccountant, got[1]),
            ):
                accountant = kind()
                accountant.history = [(sigma, rate, steps)]
                expected = accountant.get_epsilon(1e-5)
                if not math.isclose(float(value), expected, rel_tol=1e-3):
                    raise _WrongAnswerError(f"the {name} epsilon for sigma = {sigma} is off")

    return _verdict("11.3", run)


# -- Tutorial 9 ----------------------------------------------------------------------------------


def check_conv_per_example(conv1d_per_example: Callable) -> bool:
    """Check exercise 9.1.

    ``conv1d_per_example(conv, x, grad_output)`` returns the per-example weight gradients
    ``(n, C_out, C_in, k)`` of an ``nn.Conv1d`` from its input and each example's output
    gradient; the check's convolution has a stride, a dilation and circular padding.
    """

    def run() -> None:
        torch.manual_seed(5)
        conv = nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2, padding_mode="circular")
        conv = conv.double()
        x, y = _randn(5, 3, 11, seed=108), _randn(5, 4, 6, seed=109)
        mse = nn.MSELoss(reduction="sum")
        expected, _ = goodfellow.torch_func_per_example_grads(conv, mse, x, y)
        grad_output = 2 * (conv(x) - y).detach()  # each example's own d(loss)/d(output)
        _compare(_call(conv1d_per_example, conv, x, grad_output), expected, "your gradients")

    return _verdict("9.1", run)


def check_depthwise_fraction(useful_fraction: float) -> bool:
    """Check exercise 9.2: the share of the dense product's entries that are weight gradients.

    For ``nn.Conv2d(32, 32, 3, groups=32)``, whose dense product is ``(C_out, C_in K)``.
    """

    def run() -> None:
        _answered(useful_fraction)
        conv = nn.Conv2d(32, 32, 3, groups=32)
        dense = conv.out_channels * conv.in_channels * math.prod(conv.kernel_size)
        if not math.isclose(float(useful_fraction), conv.weight.numel() / dense, rel_tol=1e-9):
            raise _WrongAnswerError("count the weight's entries and the dense product's")

    return _verdict("9.2", run)


def check_gram_limit(gram_limit: int, width: int = 256) -> bool:
    """Check exercise 9.3: the largest T with ``T (d_in + d_out) <= d_in d_out``, d = 256."""

    def run() -> None:
        _answered(gram_limit)
        expected = max(t for t in range(width * width + 1) if t * 2 * width <= width * width)
        if int(gram_limit) != expected:
            raise _WrongAnswerError("compare T (d_in + d_out) with d_in d_out")

    return _verdict("9.3", run)
