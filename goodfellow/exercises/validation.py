"""Checks of tutorial 4 (``04_validation``): validating per-example gradients.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

import goodfellow
from goodfellow.exercises._common import (
    _answered,
    _batch,
    _call,
    _compare_lists,
    _mlp,
    _verdict,
    _WrongAnswerError,
)

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
