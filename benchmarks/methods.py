"""The configurations and the contenders of the benchmark.

Every configuration is the same kind of problem: a network (an MLP with ReLU between its linear
layers, a small CNN: ``cnn-mnist`` and DeepOBS' ``3c3d``, or a tiny causal language model,
``tiny-lm`` and ``tiny-lm-mha``), float32, a batch of ``n`` random inputs with random class labels
(random token sequences and next tokens for the language models), and the cross-entropy summed
over the batch (``reduction="sum"``; for a language model summed over the tokens of each example
and over the examples), so that every method's per-example gradient is directly
:math:`\\nabla_\\theta L_i`, with no batch-size factor to undo.

A contender is a :class:`Method`:

* ``step()`` is what gets timed: the forward, the loss and whatever the method does to produce its
  result, from the input batch to finished numbers;
* ``reset()`` drops the previous step's results outside the timed region, as a training loop's
  ``zero_grad(set_to_none=True)`` would (this is generous to the methods that allocate their
  results afresh every step: freeing them is not counted);
* ``result()`` hands out what the last step computed, and :func:`check` compares it with the naive
  per-example loop before anything is timed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import goodfellow as gf

MNIST_WIDTHS = (784, 256, 256, 10)
WIDE_WIDTHS = (784, 1024, 1024, 10)
DEEP_WIDTHS = (64, *([64] * 8), 10)

WRITE_VALUE = 0.5
"""What ``write_floor`` writes into every entry of its buffer."""


@dataclass(frozen=True)
class Config:
    """One benchmark setting: the network and the batch size.

    Attributes:
        name: The network's name, the first half of the label.
        widths: For an MLP its layer widths; for a CNN the input channels, the channels of each
            convolution and the widths of the linear layers after it (recorded, not used).
            For a language model ``(vocab, d, heads, blocks)``.
        n: The batch size.
        arch: ``"mlp"``, a key of :data:`CNNS` (then ``widths`` only describes it), or a key of
            :data:`LMS`.
        seq_len: The sequence length ``T`` of a language model (``None`` otherwise).
    """

    name: str
    widths: tuple[int, ...]
    n: int
    arch: str = "mlp"
    seq_len: int | None = None

    @property
    def label(self) -> str:
        if self.is_lm:
            return f"{self.name}/T{self.seq_len}-n{self.n}"
        return f"{self.name}/n{self.n}"

    @property
    def is_mlp(self) -> bool:
        return self.arch == "mlp"

    @property
    def is_lm(self) -> bool:
        return self.arch in LMS

    @property
    def family(self) -> str:
        """``"mlp"``, ``"cnn"``, ``"lm"`` (attention from four ``nn.Linear``) or ``"lm-mha"``."""
        if self.is_mlp:
            return "mlp"
        return LMS[self.arch] if self.is_lm else "cnn"

    @property
    def num_classes(self) -> int:
        """Classes of the labels: the last width, or a language model's vocabulary."""
        return self.widths[0] if self.is_lm else self.widths[-1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's input shape: ``(d_0,)``, ``(C, H, W)`` or ``(T,)`` tokens."""
        if self.is_lm:
            return (self.seq_len,)
        return (self.widths[0],) if self.is_mlp else CNNS[self.arch][0]

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """``(d_out, d_in)`` of every linear layer of an MLP."""
        return list(zip(self.widths[1:], self.widths[:-1]))

    def sequential(self) -> nn.Module:
        """A freshly initialised network (float32, CPU): ``nn.Sequential`` or :class:`TinyLM`."""
        if self.is_mlp:
            modules: list[nn.Module] = []
            for index, (d_out, d_in) in enumerate(self.layer_shapes):
                modules += [nn.ReLU()] if index > 0 else []
                modules.append(nn.Linear(d_in, d_out))
            return nn.Sequential(*modules)
        if self.is_lm:
            vocab, d, heads, blocks = self.widths
            return TinyLM(vocab, d, heads, blocks, self.seq_len, mha=self.family == "lm-mha")
        return CNNS[self.arch][1]()

    @property
    def num_params(self) -> int:
        if self.is_mlp:
            return sum(d_out * d_in + d_out for d_out, d_in in self.layer_shapes)
        with torch.device("meta"):
            return sum(p.numel() for p in self.sequential().parameters())

    @property
    def per_example_mb(self) -> float:
        """Size of all per-example gradients of the batch in float32, n * P * 4 bytes, in MiB."""
        return self.n * self.num_params * 4 / 2**20


def _cnn_mnist() -> nn.Sequential:
    """1x28x28 -> conv 5x5 (16) -> pool -> conv 5x5 (32) -> pool -> linear (10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (16, 14, 14)
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (32, 7, 7)
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip


def _3c3d() -> nn.Sequential:
    """DeepOBS' 3c3d on 3x32x32: three conv-ReLU-pool blocks, three linear layers."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, 1),  # (64, 14, 14)
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),  # (96, 6, 6)
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),  # (128, 3, 3)
        nn.Flatten(), nn.Linear(128 * 3 * 3, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def _tiny_cnn() -> nn.Sequential:
    """2x6x6, for the tests: a strided conv with reflect padding, a grouped one, a linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),  # (4, 6, 6)
        nn.MaxPool2d(2),  # (4, 3, 3)
        nn.Conv2d(4, 4, 2, groups=2), nn.ReLU(),  # (4, 2, 2)
        nn.Flatten(), nn.Linear(16, 3),
    )  # fmt: skip


def _tiny_cnn_zeros() -> nn.Sequential:
    """2x6x6, for the tests of the peers (which get non-zero padding modes wrong)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(),  # (4, 3, 3)
        nn.Conv2d(4, 3, 2), nn.ReLU(),  # (3, 2, 2)
        nn.Flatten(), nn.Linear(12, 3),
    )  # fmt: skip


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written from four ``nn.Linear`` projections.

    Every parameter sits in an ``nn.Linear`` applied to ``(n, T, d)``, so that hook-based
    libraries (Opacus, goodfellow's linear rule) see it; the attention itself is parameter-free
    arithmetic between them: softmax(Q K^T / sqrt(d_h) + causal mask) V per head.

    The key projection has no bias: a key bias b adds q_t . b to every score of query t, the
    same for all keys, which the softmax cancels, so its gradient is exactly zero and every
    method's result for it would be rounding noise (which no relative check can judge).
    """

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.value, self.out = (nn.Linear(d, d) for _ in range(3))
        self.key = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.view(n, t, h, d // h).transpose(1, 2)  # (n, h, T, d_h)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # Written out rather than F.scaled_dot_product_attention: torch.func has no batching
        # rule for the CPU flash-attention backward and would fall back to a slow loop.
        scores = q @ k.transpose(-2, -1) / (d // h) ** 0.5  # (n, h, T, T)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)  # (n, h, T, T)
        mixed = weights @ v  # (n, h, T, d_h)
        return self.out(mixed.transpose(1, 2).reshape(n, t, d))  # (n, T, d)


class MHACausalSelfAttention(nn.Module):
    """The same attention through ``nn.MultiheadAttention`` (``batch_first=True``)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        # True above the diagonal: position t attends to positions <= t only.
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        return self.attention(x, x, x, attn_mask=mask, need_weights=False)[0]  # (n, T, d)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4d GELU MLP."""

    def __init__(self, d: int, heads: int, mha: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attention = (MHACausalSelfAttention if mha else CausalSelfAttention)(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))  # (n, T, d)
        return x + self.mlp(self.norm2(x))  # (n, T, d)


class TinyLM(nn.Module):
    """Token and position embeddings, pre-norm blocks, a final LayerNorm and a linear head.

    The positions are looked up on ``arange(T)`` expanded to ``(n, T)``, so that the position
    embedding, like every other layer, is applied to a tensor with the batch dimension (a lookup
    on ``(T,)`` broadcast over the batch would hide the per-example split from every hook).

    Args:
        vocab: Vocabulary size.
        d: Model width.
        heads: Attention heads (``d`` divisible by it).
        blocks: Number of transformer blocks.
        max_len: Longest sequence (rows of the position embedding).
        mha: Attention by ``nn.MultiheadAttention`` instead of four ``nn.Linear``.
    """

    def __init__(
        self, vocab: int, d: int, heads: int, blocks: int, max_len: int, mha: bool = False
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(max_len, d)
        self.blocks = nn.Sequential(*(Block(d, heads, mha) for _ in range(blocks)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        # Contiguous, not a stride-0 expand: Opacus' ghost-clipping norm of an embedding calls
        # .view(-1, 1) on the indices, which a broadcast view refuses.
        positions = torch.arange(t, device=tokens.device).expand(n, t).contiguous()  # (n, T)
        x = self.tokens(tokens) + self.positions(positions)  # (n, T, d)
        return self.head(self.norm(self.blocks(x)))  # (n, T, vocab)


class TokenCrossEntropy(nn.Module):
    """Cross-entropy of next-token logits, summed over the tokens of each example.

    ``reduction="sum"`` (the benchmark's loss) also sums over the examples; ``"none"`` returns
    the ``(n,)`` per-example losses :math:`L_i = \\sum_t \\ell(z_{i,t}, y_{i,t})`, which is what
    Opacus' ``DPLossFastGradientClipping`` asks of its criterion (it sets ``reduction`` to
    ``"none"`` and expects one loss per example).
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        n, t, vocab = logits.shape
        per_token = F.cross_entropy(
            logits.reshape(n * t, vocab), targets.reshape(n * t), reduction="none"
        )  # (n T,)
        per_example = per_token.view(n, t).sum(1)  # (n,)
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        raise ValueError(f"TokenCrossEntropy: reduction {self.reduction!r}; use 'sum' or 'none'.")


LMS: dict[str, str] = {"tiny-lm": "lm", "tiny-lm-mha": "lm-mha"}
"""Language-model architecture -> its family (attention from ``nn.Linear`` or by MHA)."""
LM_WIDTHS = (96, 128, 4, 2)
"""Vocabulary, width, heads and blocks of the benchmark's language models."""


CNNS: dict[str, tuple[tuple[int, ...], Callable[[], nn.Sequential]]] = {
    "cnn-mnist": ((1, 28, 28), _cnn_mnist),
    "3c3d": ((3, 32, 32), _3c3d),
    "tiny-cnn": ((2, 6, 6), _tiny_cnn),
    "tiny-cnn-zeros": ((2, 6, 6), _tiny_cnn_zeros),
}
"""Input shape of one example and the network, per CNN architecture."""

CONFIGS = (
    Config("mnist-mlp", MNIST_WIDTHS, 32),
    Config("mnist-mlp", MNIST_WIDTHS, 128),
    Config("mnist-mlp", MNIST_WIDTHS, 512),
    Config("wide-mlp", WIDE_WIDTHS, 128),
    Config("deep-mlp", DEEP_WIDTHS, 256),
    Config("cnn-mnist", (1, 16, 32, 10), 128, "cnn-mnist"),
    Config("3c3d", (3, 64, 96, 128, 512, 256, 10), 64, "3c3d"),
    Config("tiny-lm", LM_WIDTHS, 32, "tiny-lm", 64),
    Config("tiny-lm", LM_WIDTHS, 8, "tiny-lm", 256),
    Config("tiny-lm-mha", LM_WIDTHS, 32, "tiny-lm-mha", 64),
)
QUICK_CONFIGS = (CONFIGS[0], CONFIGS[1], CONFIGS[4])
CONV_CONFIGS = (CONFIGS[5], CONFIGS[6])
LM_CONFIGS = (CONFIGS[7], CONFIGS[8], CONFIGS[9])
LARGEST = ("mnist-mlp/n512", "wide-mlp/n128")
"""The two configurations with the most per-example numbers (n * P), where the issue asks for 2x."""


def config_by_label(label: str) -> Config:
    """Look a configuration up by its label, e.g. ``"mnist-mlp/n512"``."""
    for config in CONFIGS:
        if config.label == label:
            return config
    raise ValueError(
        f"unknown configuration {label!r}; choose from {[c.label for c in CONFIGS]}."
    )


def _float64(inputs: Tensor) -> Tensor:
    """A batch for the float64 copy of a model: images in float64, tokens as they are."""
    return inputs.double() if inputs.is_floating_point() else inputs


class Problem:
    """A configuration's model and batch, and the naive-loop reference to check methods against.

    Args:
        config: Widths and batch size.
        device: Where the model and the batch live.
        dtype: Floating-point type of the model and the inputs (float32 in the benchmark,
            float64 in the tests).
        seed: Seeds the weights, the inputs and the labels.
        reference: Compute the naive-loop reference (and clip at the median norm). ``False``
            skips it and clips at 1.0: for a device whose values cannot be read back, such as
            ``"meta"``, on which the tests run every method to find tensors left on the CPU.
    """

    def __init__(
        self,
        config: Config,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        reference: bool = True,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        widths = config.widths
        self.mlp: gf.MLP | None = None
        self.model: nn.Sequential | None = None
        if config.is_mlp:
            self.mlp = gf.MLP(widths[0], list(widths[1:-1]), widths[-1]).to(self.device, dtype)
        else:
            self.model = config.sequential().to(self.device, dtype)
        shape = (config.n, *config.input_shape)
        self.loss_fn: nn.Module = nn.CrossEntropyLoss(reduction="sum")
        if config.is_lm:
            self.inputs = torch.randint(config.num_classes, shape, generator=generator)
            self.targets = torch.randint(config.num_classes, shape, generator=generator)
            self.loss_fn = TokenCrossEntropy("sum")
        else:
            self.inputs = torch.randn(shape, generator=generator, dtype=dtype)
            self.targets = torch.randint(config.num_classes, (config.n,), generator=generator)
        self.inputs = self.inputs.to(self.device)  # (n, d_0), (n, C, H, W) or (n, T) tokens
        self.targets = self.targets.to(self.device)  # (n,) or (n, T)
        self.max_norm = 1.0
        self.reference: list[Tensor] | None = None
        if reference:
            self._compute_reference()

    def _compute_reference(self) -> None:
        # The reference: one backward per example, on a float64 copy of the same weights and
        # inputs, rounded to the problem's dtype at the end. Not in float32: on a network with
        # max pooling, a float32 forward of one example alone can route a pooling window to
        # another entry than the batched forward does (see :func:`pooling_routes_differ`).
        reference = gf.naive_per_example_grads(
            self.sequential().double(), self.loss_fn, _float64(self.inputs), self.targets
        )  # [(n, d_out, d_in), (n, d_out), ...] in float64
        flat = torch.cat([g.flatten(1) for g in reference], dim=1)  # (n, P)
        norms = flat.norm(dim=1)  # (n,)
        # Clip at the median norm, so that about half of the examples are clipped.
        self.max_norm = float(norms.median())
        factors = (self.max_norm / norms).clamp(max=1.0)  # (n,)
        self.reference = [g.to(self.dtype) for g in reference]
        self.reference_norms = norms.to(self.dtype)
        self.reference_clipped_mean = [
            (g * factors.view(-1, *[1] * (g.dim() - 1))).mean(0).to(self.dtype)
            for g in reference
        ]  # [(d_out, d_in), (d_out,), ...]
        self.reference_batch_grad = [g.sum(0).to(self.dtype) for g in reference]

    def sequential(self) -> nn.Module:
        """A fresh copy of the network with the problem's weights (Linear, ReLU, ... for an MLP)."""
        if self.mlp is None:
            return copy.deepcopy(self.model)
        modules: list[nn.Module] = []
        for index, layer in enumerate(self.mlp.layers):
            if index > 0:
                modules.append(nn.ReLU())
            modules.append(copy.deepcopy(layer))
        return nn.Sequential(*modules)

    def mlp_copy(self) -> gf.MLP:
        if self.mlp is None:
            raise ValueError(f"{self.config.label} is not an MLP: no goodfellow.MLP route.")
        return copy.deepcopy(self.mlp)

    def linear_grads(self, mlp: gf.MLP) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """Forward, loss, and the gradient w.r.t. every layer's output (not w.r.t. the weights).

        ``autograd.grad`` stops at the linear combinations, so this backward skips all the
        weight-gradient matrix products a plain ``loss.backward()`` does.
        """
        prediction, activations, linear_combs = mlp(self.inputs)
        loss = self.loss_fn(prediction, self.targets)
        linear_grads = torch.autograd.grad(loss, linear_combs)  # [(n, d_l), ...]
        return [a.detach() for a in activations], linear_grads


class Method:
    """A contender. ``produces`` says what its result is, and so how it is checked:

    * ``"per_example"``: a list ``[(n, *p.shape) for p in parameters]``;
    * ``"batch"``: the ordinary batch gradient, ``[p.shape for p in parameters]``;
    * ``"norms"``: ``(n,)`` norms of the per-example gradients;
    * ``"clipped_mean"``: :math:`\\frac1n \\sum_i \\min(1, C / \\|g_i\\|)\\, g_i`, parameter-shaped;
    * ``"write"``: a buffer of ``n * P`` floats that all hold :data:`WRITE_VALUE`.
    """

    name: ClassVar[str]
    produces: ClassVar[str]
    description: ClassVar[str]
    approximation: ClassVar[float] = 0.0
    """Relative deviation the method makes on purpose, added to the check's tolerance."""
    forwards_each_example_alone: ClassVar[bool] = False
    """Whether the method runs each example's forward as a batch of one (the naive loop), so
    that its max-pooling windows may pick another of two near-equal entries (:func:`check`)."""
    mlp_only: ClassVar[bool] = False
    """Whether the method needs a :class:`goodfellow.MLP` (the ``goodfellow_backprop`` route)."""
    families: ClassVar[frozenset[str]] = frozenset({"mlp", "cnn", "lm", "lm-mha"})
    """The :attr:`Config.family` values the method supports (a peer may lack a layer's rule)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.workspace_bytes = 0
        """Memory the method keeps between steps (reused output buffers), in bytes."""

    def step(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop the previous step's results (not timed)."""

    def release(self) -> None:
        """Drop what the method keeps of the previous step beyond its results (its records).

        Called before a step whose memory is measured, not before timed steps: a recorder
        frees the previous batch's records itself when the next forward begins.
        """

    def result(self) -> list[Tensor] | Tensor:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def methods_for(config: Config, names: list[str] | None = None) -> list[str]:
    """The methods among ``names`` (default: all) that apply to ``config``, in order."""
    names = list(METHODS) if names is None else names
    return [
        name
        for name in names
        if (config.is_mlp or not METHODS[name].mlp_only)
        and config.family in METHODS[name].families
    ]


def _backward(recorder: gf.PerExampleGradients, loss: Tensor) -> None:
    """``recorder.backward(loss)``: the backward only as far as the recorded layers' outputs.

    The recorder needs dL/dZ at every layer's output, not the summed weight gradients a plain
    ``loss.backward()`` also computes (one extra weight-gradient product per layer, the largest
    part of the backward of a CNN or a transformer), which every per-example method then
    recomputes in its own form: :meth:`goodfellow.PerExampleGradients.backward` skips them
    (on the batches whose sums it checks, the first three and every tenth, it computes them
    too). ``torch.func`` computes no summed gradient either.
    """
    recorder.backward(loss)


def _buffers(problem: Problem) -> list[Tensor]:
    """A contiguous buffer per parameter, ``(n, d_out, d_in)`` or ``(n, d_out)``, untouched."""
    n, options = problem.config.n, {"device": problem.device, "dtype": problem.dtype}
    buffers = []
    for d_out, d_in in problem.config.layer_shapes:
        buffers += [torch.empty(n, d_out, d_in, **options), torch.empty(n, d_out, **options)]
    return buffers


@register
class PlainBackward(Method):
    name = "plain_backward"
    produces = "batch"
    description = "one batched forward and loss.backward(): the floor, no per-example anything"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.model = problem.sequential()

    def step(self) -> None:
        p = self.problem
        p.loss_fn(self.model(p.inputs), p.targets).backward()

    def reset(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def result(self) -> list[Tensor]:
        return [param.grad for param in self.model.parameters()]


@register
class WriteFloor(Method):
    name = "write_floor"
    produces = "write"
    description = "fill a kept buffer of n * P floats: the memory-bandwidth floor of materializing"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        numel = problem.config.n * problem.config.num_params
        self.buffer = torch.empty(numel, device=problem.device, dtype=problem.dtype)
        self.workspace_bytes = self.buffer.numel() * self.buffer.element_size()

    def step(self) -> None:
        self.buffer.fill_(WRITE_VALUE)

    def result(self) -> Tensor:
        return self.buffer


class _Reference(Method):
    """A reference route of goodfellow.backprop, called on the whole batch every step."""

    produces = "per_example"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.model = problem.sequential()
        self.grads: list[Tensor] | None = None

    @staticmethod
    def compute(model, loss_fn, inputs, targets) -> list[Tensor]:
        raise NotImplementedError

    def step(self) -> None:
        p = self.problem
        self.grads = self.compute(self.model, p.loss_fn, p.inputs, p.targets)

    def reset(self) -> None:
        self.grads = None

    def result(self) -> list[Tensor]:
        return self.grads


@register
class NaiveLoop(_Reference):
    name = "naive_loop"
    description = "one forward and backward per example (goodfellow.naive_per_example_grads)"
    compute = staticmethod(gf.naive_per_example_grads)
    forwards_each_example_alone = True


@register
class TorchFuncVmap(_Reference):
    name = "torch_func_vmap"
    description = "vmap(grad(loss of one example)) (goodfellow.torch_func_per_example_grads)"
    compute = staticmethod(gf.torch_func_per_example_grads)


@register
class Opacus(Method):
    name = "opacus"
    produces = "per_example"
    # Opacus has no grad sampler for nn.MultiheadAttention (only for its DPMultiheadAttention).
    families = frozenset({"mlp", "cnn", "lm"})
    description = "Opacus GradSampleModule (hooks mode): p.grad_sample after loss.backward()"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        from opacus import GradSampleModule

        self.model = problem.sequential()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.wrapped = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")

    def step(self) -> None:
        p = self.problem
        p.loss_fn(self.wrapped(p.inputs), p.targets).backward()

    def reset(self) -> None:
        self.wrapped.zero_grad(set_to_none=True)

    def result(self) -> list[Tensor]:
        return [param.grad_sample for param in self.model.parameters()]


@register
class Backpack(Method):
    name = "backpack"
    produces = "per_example"
    # BackPACK's BatchGrad has no rule for nn.Embedding or nn.LayerNorm.
    families = frozenset({"mlp", "cnn"})
    description = "BackPACK's BatchGrad extension: p.grad_batch after loss.backward()"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        from backpack import extend
        from backpack.extensions import BatchGrad

        self.model = extend(problem.sequential())
        self.extension = BatchGrad()

    def step(self) -> None:
        from backpack import backpack

        p = self.problem
        with backpack(self.extension):
            p.loss_fn(self.model(p.inputs), p.targets).backward()

    def reset(self) -> None:
        for param in self.model.parameters():
            param.grad = None
            if hasattr(param, "grad_batch"):
                del param.grad_batch

    def result(self) -> list[Tensor]:
        return [param.grad_batch for param in self.model.parameters()]


@register
class GoodfellowBackprop(Method):
    name = "goodfellow_backprop"
    produces = "per_example"
    mlp_only = True
    description = "goodfellow.goodfellow_backprop with out= buffers kept across steps"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.mlp = problem.mlp_copy()
        self.buffers = _buffers(problem)
        self.workspace_bytes = sum(b.numel() * b.element_size() for b in self.buffers)

    def step(self) -> None:
        activations, linear_grads = self.problem.linear_grads(self.mlp)
        gf.goodfellow_backprop(activations, linear_grads, "sum", out=self.buffers)

    def result(self) -> list[Tensor]:
        return self.buffers


@register
class GoodfellowBackpropFresh(Method):
    name = "goodfellow_backprop_fresh"
    produces = "per_example"
    mlp_only = True
    description = "goodfellow.goodfellow_backprop allocating its result every step (no out=)"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.mlp = problem.mlp_copy()
        self.grads: list[Tensor] | None = None

    def step(self) -> None:
        activations, linear_grads = self.problem.linear_grads(self.mlp)
        self.grads = gf.goodfellow_backprop(activations, linear_grads, "sum")

    def reset(self) -> None:
        self.grads = None

    def result(self) -> list[Tensor]:
        return self.grads


@register
class Hooks(Method):
    name = "hooks"
    produces = "per_example"
    description = "goodfellow.PerExampleGradients(reuse_buffers=True) around loss.backward()"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.model = problem.sequential()
        self.names = [name for name, _ in self.model.named_parameters()]
        self.recorder = gf.PerExampleGradients(
            self.model, loss_reduction="sum", reuse_buffers=True
        ).attach()
        # The recorder keeps the tensors of one batch to write the next into: n * P numbers.
        config = problem.config
        self.workspace_bytes = config.n * config.num_params * problem.inputs.element_size()

    def step(self) -> None:
        p = self.problem
        _backward(self.recorder, p.loss_fn(self.model(p.inputs), p.targets))
        self.recorder.grads  # noqa: B018 - materializes the per-example gradients

    def reset(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def release(self) -> None:
        self.recorder.clear()  # the records; the reused buffers stay (its workspace)

    def result(self) -> list[Tensor]:
        grads = self.recorder.grads
        return [grads[name] for name in self.names]


class _Factored(Method):
    """The MLP route on an MLP; on a CNN the recorder's factors (``recorded_factors``)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.mlp = problem.mlp_copy() if problem.mlp is not None else None
        if self.mlp is None:
            self.model = problem.sequential()
            self.recorder = gf.PerExampleGradients(self.model, loss_reduction="sum").attach()

    def recorded_factors(self) -> dict:
        """Forward, ``loss.backward()`` under the recorder, and its factors per layer."""
        p = self.problem
        _backward(self.recorder, p.loss_fn(self.model(p.inputs), p.targets))
        return gf.recorded_factors(self.recorder)

    def reset(self) -> None:
        if self.mlp is None:
            self.model.zero_grad(set_to_none=True)

    def release(self) -> None:
        if self.mlp is None:
            self.recorder.clear()


@register
class NormsOnly(_Factored):
    name = "norms_only"
    produces = "norms"
    description = (
        "goodfellow.per_example_norms: ||G_i||^2 (||A_i||^2 + 1), nothing n * P; on a CNN "
        "goodfellow.gradient_norms(recorded_factors(pe)), on a language model "
        "pe.backward_with_norms(loss)"
    )

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.norms: Tensor | None = None

    def step(self) -> None:
        if self.mlp is None and self.problem.config.is_lm:
            # Each layer's norms inside the backward, its records dropped there: a language
            # model's records outweigh one layer's norm workspace. A CNN's conv norms form
            # per-example gradients, which peak lower after the backward, once autograd has
            # freed the activations (benchmarks/README.md, "Memory").
            p = self.problem
            loss = p.loss_fn(self.model(p.inputs), p.targets)
            self.norms = self.recorder.backward_with_norms(loss)
            return
        if self.mlp is None:
            self.norms = gf.gradient_norms(self.recorded_factors())
            return
        activations, linear_grads = self.problem.linear_grads(self.mlp)
        self.norms = gf.per_example_norms(activations, linear_grads, "sum")

    def reset(self) -> None:
        super().reset()
        self.norms = None

    def result(self) -> Tensor:
        return self.norms


@register
class ClippedMean(_Factored):
    name = "clipped_mean"
    produces = "clipped_mean"
    description = (
        "goodfellow.clipped_mean of goodfellow.mlp_factors (on a CNN of "
        "goodfellow.recorded_factors): a DP-SGD step without noise"
    )

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.names = [name for name, _ in problem.sequential().named_parameters()]
        self.grads: list[Tensor] | None = None

    def step(self) -> None:
        if self.mlp is None:
            clipped = gf.clipped_mean(self.recorded_factors(), self.problem.max_norm)
            self.grads = [clipped[name] for name in self.names]
            return
        activations, linear_grads = self.problem.linear_grads(self.mlp)
        # Norms from the factors, weights w_i = min(1, C / ||g_i||) / n, then per layer the
        # reweighted batch-gradient product (w * G)^T A: no per-example tensor is formed.
        factors = gf.mlp_factors(activations, linear_grads, "sum")
        self.grads = gf.clipped_mean(factors, self.problem.max_norm)

    def reset(self) -> None:
        super().reset()
        self.grads = None

    def result(self) -> list[Tensor]:
        return self.grads



@register
class GhostClippedMean(Method):
    name = "ghost_clipped_mean"
    produces = "clipped_mean"
    description = (
        "goodfellow.ghost_clipped_mean: the norms during a first backward, the clipped sum as "
        "the gradient of the reweighted loss from a second (no records held between them)"
    )

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.model = problem.sequential()
        self.names = [name for name, _ in self.model.named_parameters()]
        self.recorder = gf.PerExampleGradients(self.model, loss_reduction="sum").attach()
        self.per_example_loss = (
            TokenCrossEntropy("none")
            if problem.config.is_lm
            else nn.CrossEntropyLoss(reduction="none")
        )
        self.grads: list[Tensor] | None = None

    def step(self) -> None:
        p = self.problem
        losses = self.per_example_loss(self.model(p.inputs), p.targets)  # (n,)
        clipped = gf.ghost_clipped_mean(self.recorder, losses, p.max_norm)
        self.grads = [clipped[name] for name in self.names]

    def reset(self) -> None:
        self.grads = None

    def release(self) -> None:
        self.recorder.clear()

    def result(self) -> list[Tensor]:
        return self.grads


@register
class OpacusGhostClipping(Method):
    name = "opacus_ghost_clipping"
    produces = "clipped_mean"
    families = frozenset({"mlp", "cnn", "lm"})
    description = "Opacus ghost clipping (GradSampleModuleFastGradientClipping, noise 0)"
    # Opacus clips with C / (||g_i|| + 1e-6) instead of C / ||g_i||.
    approximation = 1e-5

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.model = problem.sequential()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.wrapped = GradSampleModuleFastGradientClipping(
                self.model,
                batch_first=True,
                loss_reduction="sum",
                max_grad_norm=problem.max_norm,
                use_ghost_clipping=True,
            )
            self.optimizer = DPOptimizerFastGradientClipping(
                torch.optim.SGD(self.model.parameters(), lr=0.0),
                noise_multiplier=0.0,
                max_grad_norm=problem.max_norm,
                expected_batch_size=problem.config.n,
                loss_reduction="sum",
            )
        # The criterion must reduce with "sum" and give one loss per example under
        # reduction="none" (DPLossFastGradientClipping switches to it): per-token losses, as
        # nn.CrossEntropyLoss gives on flattened logits, make its first backward non-scalar.
        criterion = (
            TokenCrossEntropy("sum")
            if problem.config.is_lm
            else nn.CrossEntropyLoss(reduction="sum")
        )
        self.criterion = DPLossFastGradientClipping(self.wrapped, self.optimizer, criterion, "sum")

    def step(self) -> None:
        p = self.problem
        # Two backwards inside: norms by the ghost-norm trick, then the reweighted loss.
        self.criterion(self.wrapped(p.inputs), p.targets).backward()

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def result(self) -> list[Tensor]:
        # p.grad holds sum_i min(1, C / ||g_i||) g_i; Opacus' optimizer divides by n in step().
        return [param.grad / self.problem.config.n for param in self.model.parameters()]


def _reference_for(method: Method) -> Callable[[], list[Tensor] | Tensor]:
    p = method.problem
    return {
        "per_example": lambda: p.reference,
        "batch": lambda: p.reference_batch_grad,
        "norms": lambda: p.reference_norms,
        "clipped_mean": lambda: p.reference_clipped_mean,
    }[method.produces]


def _pooling_routes(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The entry each max-pooling window of ``model`` picks on ``inputs``, pooling by pooling."""
    routes: list[Tensor] = []
    pool = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}

    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        _, indices = pool[type(module)](
            args[0], module.kernel_size, module.stride, module.padding, module.dilation,
            ceil_mode=module.ceil_mode, return_indices=True,
        )
        routes.append(indices)

    handles = [m.register_forward_hook(record) for m in model.modules() if type(m) in pool]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return routes


def pooling_routes_differ(problem: Problem, example: int) -> bool:
    """Whether example ``example``'s forward, run alone in the problem's dtype, routes some
    max-pooling window to another entry than the float64 forward of the whole batch does.

    Max pooling is discontinuous where two entries of a window are equal: a last-bit difference
    in the layer before it (here: the float32 convolution kernel that runs for a batch of one
    differs from the batched one in the last bit on some CPUs) moves the window's whole gradient
    to another position. Both results are then exact gradients of forwards that differ in the
    last bit; measured on 3c3d/n64 (AMD EPYC, AVX-512), one example of 64 changes by 7% of the
    largest entry of the first convolution's weight gradient.
    """
    model = problem.sequential()
    alone = _pooling_routes(model, problem.inputs[example : example + 1])
    batched = _pooling_routes(model.double(), _float64(problem.inputs))
    return any(not torch.equal(a, b[example : example + 1]) for a, b in zip(alone, batched))


def check(method: Method, tolerance: float | None = None) -> float:
    """Compare the last step's result with the naive loop; raise ``AssertionError`` if it differs.

    The deviation is measured relative to the largest entry of the reference,
    ``max|actual - expected| / max|expected|`` per tensor. The reference is the naive loop in
    float64. For a method that runs each example's forward alone
    (:attr:`Method.forwards_each_example_alone`) the deviation is taken example by example, and
    an example may exceed the tolerance only where :func:`pooling_routes_differ` says its own
    forward took another max-pooling route; those examples are left out of the returned number.

    Args:
        method: A method whose ``step()`` has run.
        tolerance: Largest allowed relative deviation; by default ``1e-4`` in float32 and
            ``1e-10`` in float64. The method's own ``approximation`` is added to it.

    Returns:
        The largest relative deviation found (``0.0`` for ``write_floor``).
    """
    p = method.problem
    if tolerance is None:
        tolerance = 1e-10 if p.dtype == torch.float64 else 1e-4
    tolerance += method.approximation
    actual = method.result()
    if method.produces == "write":
        expected_numel = p.config.n * p.config.num_params
        if actual.numel() != expected_numel or not bool((actual == WRITE_VALUE).all()):
            raise AssertionError(f"{method.name}: the buffer does not hold n * P written values.")
        return 0.0
    expected = _reference_for(method)()
    if isinstance(expected, Tensor):
        actual, expected = [actual], [expected]
    if actual is None or len(actual) != len(expected):
        raise AssertionError(f"{method.name}: expected {len(expected)} tensors, got {actual!r}.")
    worst = 0.0
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a is None or tuple(a.shape) != tuple(e.shape):
            shape = None if a is None else tuple(a.shape)
            raise AssertionError(
                f"{method.name}: result {index} has shape {shape}, expected {tuple(e.shape)}."
            )
        scale = float(e.abs().max())
        error = (a.to(e.dtype) - e).abs() / (scale if scale > 0 else 1.0)
        if method.forwards_each_example_alone and error.dim() > 0:
            per_example = error.reshape(len(error), -1).amax(dim=1)  # (n,)
            rerouted = [
                i for i in (per_example > tolerance).nonzero().flatten().tolist()
                if pooling_routes_differ(p, i)
            ]
            per_example[rerouted] = 0.0
            error = per_example
        deviation = float(error.max())
        worst = max(worst, deviation)
        if not deviation <= tolerance:
            raise AssertionError(
                f"{method.name}: result {index} deviates from the naive loop by {deviation:.2e} "
                f"(relative to its largest entry), more than {tolerance:.0e}."
            )
    return worst
