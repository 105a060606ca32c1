"""Seeded random compositions of the supported layers against torch.func, in float64.

Every rule has its own case list (``test_conv``, ``test_transformers``, ...). Here the rules
meet: each seed draws a model from the layer kinds users stack (token and position embeddings,
linear layers, one input read by several layers, a layer called twice, attention in both
layouts, normalizations, convolutions over a sequence or an image, a module holding a bare
parameter for the fallback rule, frozen parameters) and a loss reduction, and every route of
the recorder must give the numbers of ``vmap(grad(...))`` of one example's loss: the
materialized gradients (twice, the second batch written into the first one's kept buffers),
the factored norms, clipped mean, variance, second moment and noise-scale parts, the norms
taken during the backward, and the clipped mean of two backwards. Second derivatives through
the results (a gradient penalty) are checked against the naive loop.

A parameter followed by a normalization over what it shifts (a bias before a LayerNorm) has
the gradient zero exactly, which both sides give as rounding noise: the tolerance is relative
to the batch's largest per-example gradient entry, not to each parameter's own.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor, nn

from goodfellow import (
    PerExampleGradients,
    clipped_mean,
    ghost_clipped_mean,
    gradient_norms,
    gradient_second_moment,
    gradient_variance,
    noise_scale_parts,
    private_mean,
    recorded_factors,
    torch_func_per_example_grads,
)

D, V = 6, 7  # width and vocabulary of the sequence models
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


class BareScale(nn.Module):
    """A parameter held by the module itself, not by a submodule: the fallback rule's."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale)


class SharedInput(nn.Module):
    """Three linear layers reading one tensor, as q, k and v do."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D, bias=bias) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.q(x)) * self.k(x) + self.v(x)


class CalledTwice(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.tanh(self.linear(x)))


class Attention(nn.Module):
    def __init__(self, rng: random.Random, bias: bool) -> None:
        super().__init__()
        self.batch_first, self.causal = rng.random() < 0.5, rng.random() < 0.5
        heads = rng.choice([1, 2, 3])
        self.attention = nn.MultiheadAttention(D, heads, bias=bias, batch_first=self.batch_first)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, D)
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1) if self.causal else None
        y = x if self.batch_first else x.transpose(0, 1)
        out = self.attention(y, y, y, attn_mask=mask, need_weights=False)[0]
        return x + (out if self.batch_first else out.transpose(0, 1))


class OverChannels(nn.Module):
    """A module that takes ``(n, C, T)`` applied to a sequence ``(n, T, C)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.transpose(1, 2)).transpose(1, 2)


def sequence_block(rng: random.Random) -> nn.Module:
    bias = rng.random() < 0.7
    kind = rng.choice(["linear", "mlp", "norm", "attention", "shared", "twice", "conv", "bare"])
    if kind == "linear":
        return nn.Linear(D, D, bias=bias)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(D, 2 * D, bias=bias), nn.GELU(), nn.Linear(2 * D, D))
    if kind == "norm":
        return rng.choice([
            lambda: nn.LayerNorm(D, bias=bias),
            lambda: nn.RMSNorm(D),
            lambda: OverChannels(nn.GroupNorm(rng.choice([1, 2, 3]), D)),
            lambda: OverChannels(nn.InstanceNorm1d(D, affine=True)),
        ])()  # fmt: skip
    if kind == "attention":
        return Attention(rng, bias)
    if kind == "shared":
        return SharedInput(bias)
    if kind == "twice":
        return CalledTwice(bias)
    if kind == "conv":  # length kept, so that any block can follow
        conv = nn.Conv1d(D, D, rng.choice([1, 2, 3]), padding="same", bias=bias,
                         dilation=rng.choice([1, 2]), groups=rng.choice([1, 2, 3, 6]),
                         padding_mode=rng.choice(PADDING_MODES))  # fmt: skip
        return OverChannels(conv)
    return BareScale((D,))


class SequenceModel(nn.Module):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.tokens = nn.Embedding(V, D, padding_idx=rng.choice([None, 0]))
        self.positions = nn.Embedding(16, D) if rng.random() < 0.5 else None
        self.blocks = nn.Sequential(*(sequence_block(rng) for _ in range(rng.randint(1, 4))))
        self.per_token = rng.random() < 0.5
        self.head = nn.Linear(D, 3)

    def forward(self, tokens: Tensor) -> Tensor:  # (n, T)
        x = self.tokens(tokens)  # (n, T, D)
        if self.positions is not None:
            n, t = tokens.shape
            x = x + self.positions(torch.arange(t).expand(n, t).contiguous())
        x = self.blocks(x)
        return self.head(x if self.per_token else x.mean(dim=1))  # (n, T, 3) or (n, 3)


def image_activation(rng: random.Random, channels: int) -> nn.Module:
    kind = rng.choice(["relu", "groupnorm", "instancenorm", "bare"])
    if kind == "groupnorm":
        return nn.GroupNorm(rng.choice([g for g in (1, 2, 3) if channels % g == 0]), channels)
    if kind == "instancenorm":
        return nn.InstanceNorm2d(channels, affine=True)
    return BareScale((channels, 1, 1)) if kind == "bare" else nn.ReLU()


def image_model(rng: random.Random) -> nn.Sequential:
    """Convolutions of any padding mode, stride and grouping on 8 x 8 images, then a head.

    Padding 1 and at most two convolutions of stride 2 leave at least 2 x 2 positions.
    """
    layers, channels = [], rng.choice([1, 2, 3])
    first = channels
    for _ in range(rng.randint(1, 2)):
        groups = rng.choice([g for g in (1, 2, 3) if channels % g == 0])
        out = groups * rng.randint(1, 2)
        layers.append(nn.Conv2d(channels, out, rng.choice([1, 2, 3]), stride=rng.choice([1, 2]),
                                padding=1, groups=groups, bias=rng.random() < 0.7,
                                padding_mode=rng.choice(PADDING_MODES)))  # fmt: skip
        layers.append(image_activation(rng, out))
        channels = out
    layers += [nn.Flatten(), nn.LazyLinear(3)]
    model = nn.Sequential(*layers)
    model(torch.zeros(1, first, 8, 8))  # sizes the head
    model.first_channels = first
    return model


def draw(seed: int, family: str) -> tuple[nn.Module, Tensor, Tensor, str]:
    """A seed's model, batch, targets and loss reduction (some biases frozen)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n = rng.randint(2, 5)
    if family == "sequence":
        model = SequenceModel(rng).double()
        inputs = torch.randint(0, V, (n, rng.randint(5, 8)))  # longer than any padding
    else:
        model = image_model(rng).double()
        inputs = torch.randn(n, model.first_channels, 8, 8, dtype=torch.float64)
    for name, p in model.named_parameters():
        if name.endswith("bias") and rng.random() < 0.15:
            p.requires_grad_(False)
    with torch.no_grad():
        targets = torch.randn_like(model(inputs))
    return model, inputs, targets, rng.choice(["sum", "mean"])


def assert_close(actual: Tensor, expected: Tensor, scale: float, what: str) -> None:
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= 1e-10 * max(float(expected.abs().max()), 1e-3 * scale) + 1e-300, (
        f"{what}: max abs error {error:.3g}"
    )


CASES = [("sequence", seed) for seed in range(64)] + [("image", seed) for seed in range(24)]


@pytest.mark.parametrize(("family", "seed"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_every_route_matches_torch_func(family, seed):
    model, x, y, reduction = draw(seed, family)
    loss_fn = nn.MSELoss(reduction=reduction)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    n = x.shape[0]
    flat = torch.cat([g.reshape(n, -1) for g in expected.values()], dim=1)  # (n, P)
    scale, norms = float(flat.abs().max()), flat.norm(dim=1)
    max_norm = float(norms.median())  # clips some examples, not all
    factors = torch.clamp(max_norm / norms, max=1.0)
    clipped = {k: torch.tensordot(factors, g, dims=1) / n for k, g in expected.items()}
    variance = {k: g.var(dim=0, unbiased=False) for k, g in expected.items()}
    second_moment = {k: g.square().mean(dim=0) for k, g in expected.items()}
    trace = flat.var(dim=0, unbiased=True).sum()  # tr of the covariance, n - 1
    squared_mean_norm = flat.mean(dim=0).square().sum() - trace / n  # |G|^2, unbiased

    def per_example_losses(output: Tensor) -> Tensor:  # (n,): L_i of each example
        squares = (output - y).square().reshape(n, -1)
        return squares.sum(dim=1) if reduction == "sum" else squares.mean(dim=1)

    with PerExampleGradients(model, loss_reduction=reduction, reuse_buffers=True) as pe:
        for batch in range(2):  # the second batch goes into the first one's buffers
            pe.backward(loss_fn(model(x), y))
            for k in names:
                assert_close(pe.grads[k], expected[k], scale, f"batch {batch}: grads[{k!r}]")
        recorded = recorded_factors(pe)
        assert_close(gradient_norms(recorded), norms, scale, "gradient_norms")
        for k, t in clipped_mean(recorded, max_norm).items():
            assert_close(t, clipped[k], scale, f"clipped_mean[{k!r}]")
        for k, t in gradient_variance(recorded).items():
            assert_close(t, variance[k], scale**2, f"gradient_variance[{k!r}]")
        for k, t in gradient_second_moment(recorded).items():
            assert_close(t, second_moment[k], scale**2, f"gradient_second_moment[{k!r}]")
        parts = noise_scale_parts(recorded)
        assert_close(parts[0], trace, float(trace), "noise_scale_parts: trace")
        assert_close(parts[1], squared_mean_norm, float(trace), "noise_scale_parts: |G|^2")
        streamed = pe.backward_with_norms(loss_fn(model(x), y))
        assert_close(streamed, norms, scale, "backward_with_norms")
        ghost = ghost_clipped_mean(pe, per_example_losses(model(x)), max_norm)
        for k in names:
            assert_close(ghost[k], clipped[k], scale, f"ghost_clipped_mean[{k!r}]")


def naive_penalty_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module) -> dict:
    """d/dθ of the sum of the squared per-example gradient norms, one example at a time.

    The naive loop, not torch.func: ``vmap(grad(...))`` differentiated once more gives wrong
    second derivatives through a LayerNorm (torch 2.13: 47% off for the parameters before it).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    penalty = 0
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        penalty = penalty + sum(g.square().sum() for g in grads)
    return dict(zip(params, torch.autograd.grad(penalty, list(params.values()))))


def _has_fused_attention(family: str, seed: int) -> bool:
    """Whether the model attends through the fused kernel, which has no second derivative."""
    model, *_ = draw(seed, family)
    return any(isinstance(m, Attention) for m in model.modules())


SECOND_ORDER_CASES = [case for case in CASES if not _has_fused_attention(*case)]


@pytest.mark.parametrize(
    ("family", "seed"), SECOND_ORDER_CASES, ids=[f"{f}-{s}" for f, s in SECOND_ORDER_CASES]
)
def test_the_results_of_a_create_graph_backward_differentiate_like_the_naive_loop(family, seed):
    """d/dθ sum_i ||g_i||^2 through the recorder's results (a gradient penalty)."""
    model, x, y, reduction = draw(seed, family)
    loss_fn = nn.MSELoss(reduction=reduction)
    expected = naive_penalty_gradient(model, x, y, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    with PerExampleGradients(model, loss_reduction=reduction) as pe:
        torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        penalty = sum(g.square().sum() for g in pe.grads.values())
    got = torch.autograd.grad(penalty, params)
    scale = max(float(g.abs().max()) for g in expected.values())
    for (name, want), g in zip(expected.items(), got):
        assert_close(g, want, scale, f"d penalty / d {name}")


def _runs_empty(family: str, seed: int) -> bool:
    """Whether the model itself runs an empty batch (an InstanceNorm of one position does not)."""
    model, x, *_ = draw(seed, family)
    try:
        model(x[:0]).sum().backward()
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


EMPTY_CASES = [case for case in CASES if _runs_empty(*case)]


@pytest.mark.parametrize(("family", "seed"), EMPTY_CASES, ids=[f"{f}-{s}" for f, s in EMPTY_CASES])
def test_an_empty_batch_gives_empty_gradients_and_a_private_mean_of_noise(family, seed):
    """Poisson sampling draws empty batches; DP-SGD releases the noise alone for them."""
    model, x, y, reduction = draw(seed, family)
    x, y = x[:0], y[:0]
    loss_fn = nn.MSELoss(reduction="sum")
    with PerExampleGradients(model, loss_reduction="sum") as pe:
        loss_fn(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert pe.grads[name].shape == (0, *p.shape)
        recorded = recorded_factors(pe)
        silent = private_mean(recorded, 1.0, 0.0, expected_batch_size=4.0)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in silent.values())
        noisy = private_mean(recorded, 1.0, 1.0, expected_batch_size=4.0)
        assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in noisy.values())
        assert pe.backward_with_norms(loss_fn(model(x), y)).shape == (0,)


def test_the_compositions_cover_every_kind_of_block():
    """The seeds above draw every block kind and both layouts of attention at least once."""
    kinds: set[str] = set()
    for family, seed in CASES:
        model, *_ = draw(seed, family)
        for module in model.modules():
            kinds.add(type(module).__name__)
            if isinstance(module, Attention):
                kinds.add(f"attention, batch_first={module.batch_first}")
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                kinds.add(f"{type(module).__name__}, padding_mode={module.padding_mode}")
                kinds.add(f"groups > 1: {module.groups > 1}")
    wanted = {
        "Embedding", "Linear", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d",
        "InstanceNorm2d", "SharedInput", "CalledTwice", "BareScale",
        "attention, batch_first=True", "attention, batch_first=False",
        "groups > 1: True", "groups > 1: False",
        *(f"Conv{d}d, padding_mode={mode}" for d in (1, 2) for mode in PADDING_MODES),
    }  # fmt: skip
    assert wanted <= kinds, sorted(wanted - kinds)


def test_a_nonzero_difference_is_caught():
    """The tolerance is tight enough to see a per-example gradient off by one part in 1e6."""
    expected = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="grads"):
        assert_close(expected * (1 + 1e-6), expected, float(expected.abs().max()), "grads")


class Temperature(nn.Module):
    """A scalar parameter of a module's own: the fallback rule's, shape ``()``."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.t


class SelfBilinear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(d, d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.bilinear(x, torch.tanh(x))


FALLBACK_MODELS = {
    "conv-transpose-2d": (
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
                              nn.Flatten(), nn.LazyLinear(2)),
        (4, 2, 4, 4),
    ),
    "conv-transpose-1d-groups": (
        lambda: nn.Sequential(nn.ConvTranspose1d(4, 4, 3, groups=2, dilation=2), nn.Flatten(),
                              nn.LazyLinear(2)),
        (4, 4, 5),
    ),
    "bilinear": (lambda: nn.Sequential(SelfBilinear(3), nn.Linear(3, 2)), (4, 3)),
    "prelu-and-temperature": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2), Temperature()),
        (4, 3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FALLBACK_MODELS))
def test_modules_without_a_rule_go_through_the_fallback_rule(name):
    """Transposed convolutions, nn.Bilinear, nn.PReLU, a scalar parameter: torch.func's numbers."""
    make, shape = FALLBACK_MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    model(x)  # sizes the lazy head
    y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss(reduction="sum")
    names = [k for k, _ in model.named_parameters()]
    expected = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in expected.values()], dim=1)
    scale = float(flat.abs().max())
    with PerExampleGradients(model, loss_reduction="sum") as pe:
        loss_fn(model(x), y).backward()
        for k in names:
            assert_close(pe.grads[k], expected[k], scale, f"grads[{k!r}]")
        assert_close(gradient_norms(recorded_factors(pe)), flat.norm(dim=1), scale, "norms")
