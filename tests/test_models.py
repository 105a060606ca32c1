"""The MLP's contract: what forward returns, in which order, and what it refuses."""

import pytest
import torch

from goodfellow import MLP


@pytest.mark.parametrize("hidden", [[], [4], [4, 5, 6]])
def test_forward_returns_inputs_and_outputs_of_every_linear_layer(hidden):
    model = MLP(3, hidden, output_size=2, activation=torch.tanh).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y, activations, linear_combs = model(x)
    assert len(activations) == len(linear_combs) == len(hidden) + 1
    assert activations[0] is x
    assert linear_combs[-1] is y
    for layer, a, z in zip(model.layers, activations, linear_combs):
        torch.testing.assert_close(z, a @ layer.weight.T + layer.bias, rtol=1e-12, atol=1e-12)
    for z, a_next in zip(linear_combs[:-1], activations[1:]):
        torch.testing.assert_close(a_next, torch.tanh(z), rtol=1e-12, atol=1e-12)


def test_parameters_are_ordered_weight_then_bias_layer_by_layer():
    model = MLP(3, [4, 5], output_size=2)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(4, 3), (4,), (5, 4), (5,), (2, 5), (2,)]


def test_no_activation_after_the_last_layer():
    model = MLP(2, [3], output_size=1, activation=torch.relu).double()
    with torch.no_grad():
        model.layers[-1].bias.fill_(-100.0)
    y, _, _ = model(torch.randn(4, 2, dtype=torch.float64))
    assert (y < 0).all()  # a ReLU at the end would have clipped these to 0


@pytest.mark.parametrize(
    "sizes", [(0, [3], 1), (3, [0], 1), (3, [2], -1), (3.0, [2], 1), (True, [2], 1)]
)
def test_refuses_bad_sizes(sizes):
    input_size, hidden, output = sizes
    with pytest.raises(ValueError, match="positive integers"):
        MLP(input_size, hidden, output)


def test_refuses_non_callable_activation():
    with pytest.raises(TypeError, match="activation must be callable"):
        MLP(3, [2], 1, activation="relu")


@pytest.mark.parametrize("shape", [(5,), (5, 4), (5, 3, 1)])
def test_refuses_inputs_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"expects an input of shape \(n, 3\)"):
        MLP(3, [2])(torch.randn(*shape))


@pytest.mark.parametrize("hidden", [4, None, "4"], ids=["int", "none", "str"])
def test_refuses_hidden_sizes_that_are_not_a_list(hidden):
    with pytest.raises(TypeError, match="hidden_sizes must be a list"):
        MLP(3, hidden, 2)


def test_refuses_inputs_that_are_not_tensors():
    with pytest.raises(TypeError, match="expects a torch.Tensor input, got list"):
        MLP(3, [2])([[1.0, 2.0, 3.0]])
