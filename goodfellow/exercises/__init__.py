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

from goodfellow.exercises.basics import (
    check_backward_loop,
    check_batchnorm_rows,
    check_clipped_sum,
    check_epoch_estimate,
    check_in_out_layout,
    check_losses_and_norms,
    check_mean_linear_grads,
    check_mse_example_loss,
    check_parameter_count,
    check_sequence_grads,
    check_sequence_norms,
    check_single_layer_shapes,
)
from goodfellow.exercises.convolutions import (
    check_conv_per_example,
    check_depthwise_fraction,
    check_gram_limit,
)
from goodfellow.exercises.curvature import (
    check_best_diagonal,
    check_factored_damping,
    check_one_example_fisher,
    check_sum_learning_rate,
)
from goodfellow.exercises.gradiator import (
    check_best_step,
    check_broyden_update,
    check_noise_prediction,
)
from goodfellow.exercises.hooks import (
    check_first_term_grad,
    check_mse_delta,
    check_sequence_reduction,
    check_workspace,
)
from goodfellow.exercises.privacy import (
    check_removal_shifts,
    check_two_epsilons,
    check_update_noise,
)
from goodfellow.exercises.transformers import (
    check_embedding_sq_norms,
    check_largest_gram_length,
    check_layernorm_grads,
)
from goodfellow.exercises.transforms import (
    check_cabs_first_batch,
    check_cabs_learning_rate_factor,
    check_linear_transform,
    check_second_moment,
)
from goodfellow.exercises.validation import (
    check_reproduced_bugs,
    check_time_split,
    check_validation_errors,
)

__all__ = [
    "check_backward_loop",
    "check_batchnorm_rows",
    "check_best_diagonal",
    "check_best_step",
    "check_broyden_update",
    "check_cabs_first_batch",
    "check_cabs_learning_rate_factor",
    "check_clipped_sum",
    "check_conv_per_example",
    "check_depthwise_fraction",
    "check_embedding_sq_norms",
    "check_epoch_estimate",
    "check_factored_damping",
    "check_first_term_grad",
    "check_gram_limit",
    "check_in_out_layout",
    "check_largest_gram_length",
    "check_layernorm_grads",
    "check_linear_transform",
    "check_losses_and_norms",
    "check_mean_linear_grads",
    "check_mse_delta",
    "check_mse_example_loss",
    "check_noise_prediction",
    "check_one_example_fisher",
    "check_parameter_count",
    "check_removal_shifts",
    "check_reproduced_bugs",
    "check_second_moment",
    "check_sequence_grads",
    "check_sequence_norms",
    "check_sequence_reduction",
    "check_single_layer_shapes",
    "check_sum_learning_rate",
    "check_time_split",
    "check_two_epsilons",
    "check_update_noise",
    "check_validation_errors",
    "check_workspace",
]
