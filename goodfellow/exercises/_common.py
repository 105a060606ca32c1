"""What every check shares: running the student's code, comparing, printing the verdict.

A check raises ``_NotAnsweredError`` while the student has written nothing and
``_WrongAnswerError`` with a hint when the answer differs; ``_verdict`` turns either into
the printed line and the returned bool.
"""

from __future__ import annotations

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
