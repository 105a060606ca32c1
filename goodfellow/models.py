r"""A multilayer perceptron that hands out what Goodfellow's trick needs.

The model is the chain

.. math::

    A_0 \xrightarrow{W_1, b_1} Z_1 \xrightarrow{\sigma} A_1
    \xrightarrow{W_2, b_2} Z_2 \xrightarrow{\sigma} \cdots
    \xrightarrow{W_L, b_L} Z_L = \hat y,

with :math:`Z_l = A_{l-1} W_l^\top + b_l` (PyTorch's ``nn.Linear`` layout: ``W_l`` is
``(out, in)``) and no non-linearity after the last layer. ``forward`` returns the output and the
two lists of intermediate tensors, one entry per linear layer:

* ``activations[l]`` is :math:`A_l`, the input of linear layer ``l + 1`` (``activations[0]`` is
  the network's input);
* ``linear_combs[l]`` is :math:`Z_{l+1}`, that layer's output (the last one is :math:`\hat y`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """A fully connected network whose forward also returns each layer's input and output.

    Args:
        input_size: Width ``d_0`` of the input.
        hidden_sizes: Widths of the hidden layers, possibly empty (then the model is one linear
            layer).
        output_size: Width ``d_L`` of the output.
        activation: The element-wise non-linearity applied after every hidden linear layer
            (not after the last one).

    Parameters are registered in the order ``W_1, b_1, ..., W_L, b_L``, so that
    ``list(model.parameters())`` lines up with the list returned by
    :func:`goodfellow.goodfellow_backprop`.

    Example:
        >>> model = MLP(3, [4, 5], output_size=2)
        >>> y, activations, linear_combs = model(torch.randn(7, 3))
        >>> [a.shape[1] for a in activations], [z.shape[1] for z in linear_combs]
        ([3, 4, 5], [4, 5, 2])
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: Sequence[int],
        output_size: int = 1,
        activation: Callable[[Tensor], Tensor] = torch.relu,
    ) -> None:
        super().__init__()
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(
                "hidden_sizes must be a list of layer widths (possibly empty), got "
                f"{hidden_sizes!r}; write [{hidden_sizes!r}] for one hidden layer."
            )
        sizes = [input_size, *hidden_sizes, output_size]
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"MLP layer sizes must be positive integers, got {sizes} "
                    "(input_size, *hidden_sizes, output_size)."
                )
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {type(activation).__name__}.")
        self.input_size = input_size
        self.hidden_sizes = list(hidden_sizes)
        self.output_size = output_size
        self.activation = activation
        self.layers = nn.ModuleList(
            nn.Linear(size_in, size_out) for size_in, size_out in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run the network and keep every layer's input and output.

        Args:
            x: Input batch, shape ``(n, input_size)``.

        Returns:
            ``(y, activations, linear_combs)``: ``y`` of shape ``(n, output_size)``;
            ``activations[l]`` of shape ``(n, d_l)`` and ``linear_combs[l]`` of shape
            ``(n, d_{l+1})`` for ``l = 0, ..., L - 1``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"MLP expects a torch.Tensor input, got {type(x).__name__}.")
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(
                f"MLP expects an input of shape (n, {self.input_size}), got {tuple(x.shape)}."
            )
        activations: list[Tensor] = []
        linear_combs: list[Tensor] = []
        a = x  # (n, d_0)
        for index, layer in enumerate(self.layers):
            activations.append(a)
            z = layer(a)  # (n, d_{l+1})
            linear_combs.append(z)
            a = self.activation(z) if index < len(self.layers) - 1 else z
        return a, activations, linear_combs
