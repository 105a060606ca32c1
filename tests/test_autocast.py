"""Inside ``torch.autocast`` every function computes what it computes outside, in the same dtypes.

A statistic or a step called inside the region a training step runs in (the whole step under
``torch.autocast``) would otherwise have its matrix products rewritten to bfloat16: other
numbers, bfloat16 results, or a refusal (``goodfellow._autocast``). Each case below runs once
outside and once inside a CPU bfloat16 autocast, on a batch recorded outside it, and the two
results must be equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import goodfellow as gf


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 12, 16), nn.Tanh(),
        nn.Linear(16, 5),
    )  # fmt: skip


def batch() -> tuple[Tensor, Tensor]:
    return torch.randn(6, 4, 12), torch.randint(0, 5, (6,))


@pytest.fixture(scope="module")
def recorded() -> dict:
    """One recorded batch (outside autocast) and what the cases compute from it."""
    torch.manual_seed(0)
    model = convnet()
    x, y = batch()
    pe = gf.PerExampleGradients(model, "mean").attach()
    pe.backward(nn.functional.cross_entropy(model(x), y))
    mlp = gf.MLP(10, [16, 16], 3)
    _, activations, outputs = mlp(torch.randn(7, 10))
    loss = nn.functional.cross_entropy(outputs[-1], torch.randint(0, 3, (7,)), reduction="sum")
    A, G = torch.randn(20, 17), torch.randn(20, 9)
    return {
        "pe": pe, "factors": gf.recorded_factors(pe), "grads": pe.compute_grads(),
        "mlp": (activations, list(torch.autograd.grad(loss, outputs))), "A": A, "G": G,
        "basis": gf.kronecker_eigenbasis(*gf.kfac_factors(A, G)), "layer_grad": G.T @ A,
    }  # fmt: skip


def _private_mean(r: dict) -> object:
    torch.manual_seed(1)  # the same noise both times
    return gf.private_mean(r["factors"], 1.0, 1.0)


CASES: dict[str, Callable[[dict], object]] = {
    "grads": lambda r: r["pe"].compute_grads(),
    "recorded_factors": lambda r: gf.gradient_norms(gf.recorded_factors(r["pe"])),
    "gradient_norms": lambda r: gf.gradient_norms(r["factors"]),
    "gradient_mean": lambda r: gf.gradient_mean(r["factors"]),
    "clipped_mean": lambda r: gf.clipped_mean(r["factors"], 1.0),
    "clipped_mean of tensors": lambda r: gf.clipped_mean(r["grads"], 1.0),
    "gradient_second_moment": lambda r: gf.gradient_second_moment(r["factors"]),
    "gradient_variance": lambda r: gf.gradient_variance(r["factors"]),
    "gradient_variance_trace": lambda r: gf.gradient_variance_trace(r["factors"]),
    "noise_scale_parts": lambda r: gf.noise_scale_parts(r["factors"]),
    "gradient_noise_scale": lambda r: gf.gradient_noise_scale(r["factors"]),
    "private_mean": _private_mean,
    "expected_transform": lambda r: gf.expected_transform(r["grads"], gf.clip_to_norm(1.0)),
    "goodfellow_backprop": lambda r: gf.goodfellow_backprop(*r["mlp"], "sum"),
    "per_example_norms": lambda r: gf.per_example_norms(*r["mlp"], "sum"),
    "mlp_factors": lambda r: gf.clipped_mean(gf.mlp_factors(*r["mlp"], "sum"), 1.0),
    "batched_outer": lambda r: gf.batched_outer(r["G"][:, None].expand(20, 3, 9), r["A"][:, None]
                                                .expand(20, 3, 17)),  # fmt: skip
    "outer_sq_norms": lambda r: gf.outer_sq_norms(r["G"], r["A"], bias=True),
    "kfac_factors": lambda r: gf.kfac_factors(r["A"], r["G"]),
    "kronecker_eigenbasis": lambda r: gf.kronecker_eigenbasis(*gf.kfac_factors(r["A"], r["G"])),
    "ekfac_scalings": lambda r: gf.ekfac_scalings(r["A"], r["G"], r["basis"]),
    "precondition": lambda r: gf.precondition(
        r["layer_grad"], r["basis"], gf.kfac_scalings(r["basis"]), 1e-3
    ),
}


def tensors(result: object) -> list[Tensor]:
    """Every tensor of a result: a tensor, a dict or sequence of them, or a named tuple."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for value in result.values() for t in tensors(value)]
    if isinstance(result, (list, tuple)):
        return [t for value in result for t in tensors(value)]
    raise TypeError(f"no tensors in {type(result).__name__}")


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_numbers_inside_autocast(recorded, name):
    outside = tensors(CASES[name](recorded))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tensors(CASES[name](recorded))
    assert len(inside) == len(outside)
    for a, b in zip(outside, inside):
        assert b.dtype == a.dtype == torch.float32
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", [gf.EKFAC, gf.KFAC])
def test_an_optimizer_step_inside_autocast_takes_the_same_step(optimizer):
    def train(step_inside: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model = convnet()
        x, y = batch()
        opt = optimizer(model, lr=0.1, update_freq=1)
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step_inside):
                opt.step()
            opt.zero_grad()
        opt.remove_hooks()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def test_the_numbers_of_a_forward_under_autocast_do_not_depend_on_where_they_are_read():
    torch.manual_seed(0)
    model = convnet()
    x, y = batch()
    with gf.PerExampleGradients(model, "mean") as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        pe.backward(loss)
        outside = pe.compute_grads()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = pe.compute_grads()
            norms_inside = gf.gradient_norms(gf.recorded_factors(pe))
        norms_outside = gf.gradient_norms(gf.recorded_factors(pe))
    for name in outside:
        assert torch.equal(outside[name], inside[name])
    assert torch.equal(norms_outside, norms_inside)


class OutsideUse(nn.Module):
    """The first layer's weight used once more outside it: a part the recorder cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h + nn.functional.linear(h, self.first.weight))


def test_a_backward_inside_autocast_is_checked_at_its_own_precision():
    # a float32 forward whose backward runs inside autocast: autograd forms the batch gradients
    # in bfloat16, and the accounting check allows for that, no more
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    with gf.PerExampleGradients(model, "sum") as pe:
        loss = (model(x) - y).square().sum()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()
            grads = pe.grads  # a checked batch: the sums are compared with autograd's
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].sum(0), p.grad, rtol=2e-2, atol=1e-2)
    outside = OutsideUse()
    with gf.PerExampleGradients(outside, "sum") as pe:
        loss = outside(x).square().sum()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()
        with pytest.raises(ValueError, match="'first.weight' do not add up.*used outside"):
            pe.grads  # noqa: B018
