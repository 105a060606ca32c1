"""Layer rules: one module per layer kind.

A *rule* turns what the recorder saw of one module (its inputs and the gradients of its
outputs, call by call) into that module's per-example gradients, their norms, weighted sums,
second moments and, where KFAC defines them, Kronecker factors.
"""

from goodfellow.layers.linear import (
    LinearFactors,
    batched_outer,
    linear_factors,
    norm_from_squares,
    outer_sq_norms,
)

__all__ = [
    "LinearFactors",
    "batched_outer",
    "linear_factors",
    "norm_from_squares",
    "outer_sq_norms",
]
