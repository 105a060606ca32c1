"""Checks of tutorial 9 (``09_convolutions``): Goodfellow's trick through unfold.

Imported from here or from ``goodfellow.exercises``, which re-exports every check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import goodfellow
from goodfellow.exercises._common import (
    _answered,
    _call,
    _compare,
    _randn,
    _verdict,
    _WrongAnswerError,
)

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
