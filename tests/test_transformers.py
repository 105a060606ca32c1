"""Rules of transformer layers against torch.func: Embedding, norm layers, attention, fallback.

Every case of the list is a small model run through PerExampleGradients and through
``vmap(grad(...))`` of one example's loss, in float64, for both reductions. The statistics built
on the rules (norms, clipped means, second moments) are checked against the same statistics of
the materialized gradients, and the refusals against their messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from goodfellow import (
    PerExampleGradients,
    clipped_mean,
    gradient_norms,
    gradient_second_moment,
    recorded_factors,
    torch_func_per_example_grads,
)
from goodfellow.layers import embedding as embedding_rule
from goodfellow.layers import routes
from goodfellow.layers.embedding import (
    EmbeddingGradients,
    _gram_sq_norms,
    shared_gradient_sq_norms,
)
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]
V, D, T, N = 7, 6, 5, 4


class Pool(nn.Module):
    """A model around one layer: layer -> tanh -> mean over positions -> Linear head."""

    def __init__(self, layer: nn.Module, d: int = D, prepare: Callable | None = None):
        super().__init__()
        self.layer, self.head, self.prepare = layer, nn.Linear(d, 2), prepare

    def forward(self, x):
        h = self.layer(x) if self.prepare is None else self.prepare(self.layer, x)
        h = torch.tanh(h)
        return self.head(h.reshape(h.shape[0], -1, h.shape[-1]).mean(dim=1))


class TinyLM(nn.Module):
    """Token and (expanded) position embeddings, LayerNorm, MHA with a causal mask, RMSNorm."""

    def __init__(self, batch_first: bool = True, padding_idx: int | None = 0):
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(V, D, padding_idx=padding_idx)
        self.pos = nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D)
        self.mha = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.rms = nn.RMSNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        n, t = x.shape
        positions = torch.arange(t).expand(n, t)  # (n, T): the batch stays its own dimension
        h = self.ln(self.tok(x) + self.pos(positions))  # (n, T, D)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        pad = x == 0
        h = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.mha(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(self.rms(a + h if self.batch_first else a + h.transpose(0, 1)))


class Scaled(nn.Module):
    """A custom layer: a bare parameter and a Linear child used inside its forward."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(D))
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(x * self.gain) + self.gain.square()


def tokens(n=N, t=T, vocab=V):
    x = torch.randint(0, vocab, (n, t))
    x[:, -1] = 0  # a padding token in every example
    x[0, 1] = x[0, 2]  # a repeated token: rows add up
    return x


def floats(*shape):
    return lambda: torch.randn(*shape, dtype=torch.float64)


def _mha_first(layer, x):
    return layer(x, x, x, need_weights=False)[0]


def _mha_seq_first(layer, x):
    return layer(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[
        0
    ].transpose(0, 1)


def _mha_cross(layer, x):
    memory = x[:, :2] * 2  # kdim = vdim = D here, but separate projection weights below
    return layer(x, memory, memory, need_weights=False)[0]


def _mha_cross_same_dim(layer, x):
    memory = x.flip(1)[:, :3] * 2  # another tensor of the same width: three in_proj blocks
    return layer(x, memory, memory, need_weights=False)[0]


def _mha_kdim(layer, x):
    key = torch.tanh(x[..., :3])  # (n, T, 3)
    value = x[..., :5] * 0.5  # (n, T, 5)
    return layer(x, key, value, need_weights=False)[0]


def _mha_float_padding(layer, x):
    padding = torch.zeros(x.shape[0], x.shape[1], dtype=x.dtype)
    padding[:, -1] = -2.0  # a float key_padding_mask is added to the scores
    return layer(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def _mha_is_causal(layer, x):
    t = x.shape[1]
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    return layer(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]


def _frozen(module, *names):
    for name in names:
        module.get_parameter(name).requires_grad_(False)
    return module


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]


CASES = [
    Case("embedding", lambda: Pool(nn.Embedding(V, D)), lambda: tokens()),
    Case("embedding-padding", lambda: Pool(nn.Embedding(V, D, padding_idx=0)), lambda: tokens()),
    Case("embedding-long", lambda: Pool(nn.Embedding(3, D, padding_idx=2)),
         lambda: tokens(t=80, vocab=3)),  # fmt: skip
    Case("embedding-2d-positions", lambda: Pool(nn.Embedding(V, D)), lambda: tokens(t=6)[:, None]
         .expand(N, 2, 6).clone()),  # fmt: skip
    Case("layernorm", lambda: Pool(nn.LayerNorm(D)), floats(N, T, D)),
    Case("layernorm-2d-shape", lambda: Pool(nn.LayerNorm((3, D)), prepare=None),
         floats(N, 2, 3, D)),  # fmt: skip
    Case("layernorm-no-bias", lambda: Pool(nn.LayerNorm(D, bias=False)), floats(N, D)),
    Case("layernorm-frozen-weight", lambda: Pool(_frozen(nn.LayerNorm(D), "weight")),
         floats(N, T, D)),  # fmt: skip
    Case("rmsnorm", lambda: Pool(nn.RMSNorm(D)), floats(N, T, D)),
    Case("rmsnorm-eps", lambda: Pool(nn.RMSNorm(D, eps=1e-3)), floats(N, T, D)),
    Case("groupnorm", lambda: Pool(nn.GroupNorm(2, D), prepare=lambda m, x: m(x).transpose(1, 2)),
         floats(N, D, T)),  # fmt: skip
    Case("instancenorm1d", lambda: Pool(nn.InstanceNorm1d(D, affine=True),
                                        prepare=lambda m, x: m(x).transpose(1, 2)),
         floats(N, D, T)),  # fmt: skip
    Case("instancenorm2d", lambda: Pool(nn.InstanceNorm2d(D, affine=True),
                                        prepare=lambda m, x: m(x).flatten(2).transpose(1, 2)),
         floats(N, D, 3, 3)),  # fmt: skip
    Case("instancenorm3d-running-eval",
         lambda: Pool(_running(nn.InstanceNorm3d(D, affine=True, track_running_stats=True)),
                      prepare=lambda m, x: m(x).flatten(2).transpose(1, 2)),
         floats(N, D, 2, 2, 2)),  # fmt: skip
    Case("mha-batch-first", lambda: Pool(nn.MultiheadAttention(D, 2, batch_first=True),
                                         prepare=_mha_first), floats(N, T, D)),  # fmt: skip
    Case("mha-seq-first", lambda: Pool(nn.MultiheadAttention(D, 3), prepare=_mha_seq_first),
         floats(N, T, D)),  # fmt: skip
    Case("mha-kdim-bias-kv", lambda: Pool(
        nn.MultiheadAttention(D, 2, batch_first=True, kdim=D, vdim=D, add_bias_kv=True,
                              add_zero_attn=True), prepare=_mha_cross), floats(N, T, D)),
    Case("mha-frozen-in-proj", lambda: Pool(
        _frozen(nn.MultiheadAttention(D, 2, batch_first=True), "in_proj_weight"),
        prepare=_mha_first), floats(N, T, D)),  # fmt: skip
    Case("mha-cross-same-dim", lambda: Pool(nn.MultiheadAttention(D, 2, batch_first=True),
                                            prepare=_mha_cross_same_dim), floats(N, T, D)),
    Case("mha-kdim-vdim", lambda: Pool(nn.MultiheadAttention(D, 3, batch_first=True, kdim=3,
                                                             vdim=5), prepare=_mha_kdim),
         floats(N, T, D)),  # fmt: skip
    Case("mha-no-bias-float-padding", lambda: Pool(
        nn.MultiheadAttention(D, 2, bias=False, batch_first=True), prepare=_mha_float_padding),
        floats(N, T, D)),  # fmt: skip
    Case("mha-is-causal", lambda: Pool(nn.MultiheadAttention(D, 2, batch_first=True),
                                       prepare=_mha_is_causal), floats(N, T, D)),  # fmt: skip
    Case("mha-dropout-eval", lambda: Pool(
        nn.MultiheadAttention(D, 2, dropout=0.5, batch_first=True).eval(), prepare=_mha_first),
        floats(N, T, D)),  # fmt: skip
    Case("fallback-custom-layer", lambda: Pool(Scaled()), floats(N, T, D)),
    Case("fallback-two-calls", lambda: Pool(Scaled(), prepare=lambda m, x: m(torch.tanh(m(x)))),
         floats(N, T, D)),  # fmt: skip
    Case("embedding-two-calls", lambda: Pool(nn.Embedding(V, D, padding_idx=0),
                                             prepare=lambda m, x: m(x) * m(x.flip(1))),
         lambda: tokens()),  # fmt: skip
    Case("tiny-lm", lambda: nn.Sequential(TinyLM(), nn.Flatten()), lambda: tokens()),
    Case("tiny-lm-seq-first", lambda: nn.Sequential(TinyLM(batch_first=False), nn.Flatten()),
         lambda: tokens()),  # fmt: skip
    # no padding row: the token and position embeddings receive the same gradient tensor
    Case("tiny-lm-no-padding", lambda: nn.Sequential(TinyLM(padding_idx=None), nn.Flatten()),
         lambda: tokens()),  # fmt: skip
    Case("tiny-lm-frozen-embedding",
         lambda: nn.Sequential(_frozen(TinyLM(), "tok.weight"), nn.Flatten()),
         lambda: tokens()),  # fmt: skip
]


def _running(module):
    module.running_mean.uniform_(-1, 1)
    module.running_var.uniform_(0.5, 2)
    return module.eval()


def make(case: Case, reduction: str):
    """The case's model in float64, its inputs, regression targets and the loss."""
    torch.manual_seed(0)
    model = case.make().double()
    x = case.inputs()
    with torch.no_grad():
        width = model(x).shape[-1]
    y = torch.randn(x.shape[0], width, dtype=torch.float64)
    return model, x, y, nn.MSELoss(reduction=reduction)


def setup(case: Case, reduction: str):
    model, x, y, loss_fn = make(case, reduction)
    with PerExampleGradients(model, loss_reduction=reduction) as pe:
        loss_fn(model(x), y).backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    return model, pe, expected


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_per_example_gradients_match_torch_func(case, reduction):
    model, pe, expected = setup(case, reduction)
    assert list(pe.grads) == list(expected)  # every trainable parameter, claimed once
    for name, value in expected.items():
        torch.testing.assert_close(pe.grads[name], value, **F64)
    scale = 1.0 / pe.batch_size if reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        if p.requires_grad:  # the per-example gradients add up to what autograd computed
            torch.testing.assert_close(pe.grads[name].sum(dim=0) * scale, p.grad, **F64)


# recorded_factors refuses a frozen weight with a trained bias for every layer kind (a check
# written for Linear); those cases are covered by the materialized test above.
STAT_CASES = [c for c in CASES if c.name != "layernorm-frozen-weight"]


@pytest.mark.parametrize("case", STAT_CASES, ids=[c.name for c in STAT_CASES])
def test_statistics_of_the_rules_equal_the_materialized_ones(case):
    _, pe, expected = setup(case, "sum")
    factors = recorded_factors(pe)
    torch.testing.assert_close(gradient_norms(factors), gradient_norms(expected), **F64)
    norms = gradient_norms(expected)
    max_norm = float(norms.median())
    got = clipped_mean(factors, max_norm=max_norm)
    want = clipped_mean(expected, max_norm=max_norm)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64)
    got, want = gradient_second_moment(factors), gradient_second_moment(expected)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64)


@pytest.mark.parametrize("t", [3, 70])
def test_embedding_norms_both_ways_and_sums_against_materialized(t):
    torch.manual_seed(1)
    x = tokens(n=3, t=t, vocab=4)
    G = torch.randn(3, t, 5, dtype=torch.float64)
    layer = EmbeddingGradients(x, G, 4)
    (full,) = layer.per_example()  # (n, V, d)
    naive = torch.zeros(3, 4, 5, dtype=torch.float64)
    for i in range(3):
        for s in range(t):
            naive[i, x[i, s]] += G[i, s]
    torch.testing.assert_close(full, naive, **F64)
    squares = naive.square().sum(dim=(1, 2))
    torch.testing.assert_close(_gram_sq_norms(x, G), squares, **F64)
    torch.testing.assert_close(layer._unique_sq_norms(), squares, **F64)
    for route in ("gram", "unique"):
        with routes.forced(route):
            torch.testing.assert_close(layer.sq_norms(), squares, **F64)
    torch.testing.assert_close(layer.sq_norms(), squares, **F64)  # the timed choice
    w = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(layer.weighted_sum(w)[0], torch.einsum("n,nvd->vd", w, naive), **F64)
    torch.testing.assert_close(layer.square_sum()[0], naive.square().sum(dim=0), **F64)
    assert embedding_rule.GRAM_MAX_POSITIONS < 70  # both paths of sq_norms() are exercised


@pytest.mark.parametrize("t", [3, 70])
def test_embeddings_sharing_a_gradient_share_its_gram(t):
    # a token embedding and a position embedding added together get the same G
    torch.manual_seed(2)
    G = torch.randn(3, t, 5, dtype=torch.float64)
    layers = [
        EmbeddingGradients(tokens(n=3, t=t, vocab=4), G, 4),
        EmbeddingGradients(torch.arange(t).expand(3, t), G, t),
    ]
    squares = sum(layer.per_example()[0].square().sum(dim=(1, 2)) for layer in layers)
    for route in ("shared gram", "per embedding"):
        with routes.forced(route):
            torch.testing.assert_close(shared_gradient_sq_norms(layers), squares, **F64)
    torch.testing.assert_close(shared_gradient_sq_norms(layers), squares, **F64)  # timed


def test_a_token_and_a_position_embedding_are_normed_together(monkeypatch):
    monkeypatch.setattr(routes, "_CHOSEN", {})
    case = next(c for c in CASES if c.name == "tiny-lm-no-padding")
    _, pe, expected = setup(case, "sum")
    torch.testing.assert_close(
        gradient_norms(recorded_factors(pe)), gradient_norms(expected), **F64
    )
    assert "shared-gradient embedding sq norms" in [key[0] for key in routes.chosen()]


def test_padding_row_gets_no_gradient():
    _, pe, _ = setup(CASES[1], "sum")
    assert torch.count_nonzero(pe.grads["layer.weight"][:, 0]) == 0


class TiedLM(nn.Module):
    """An embedding whose matrix is also the output layer's weight (weight tying, as in GPT-2)."""

    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:  # the modules registered the other way round
            self.head = nn.Linear(D, V, bias=False)
            self.tokens = nn.Embedding(V, D)
        else:
            self.tokens = nn.Embedding(V, D)
            self.head = nn.Linear(D, V, bias=False)
        self.norm = nn.LayerNorm(D)
        self.head.weight = self.tokens.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.tokens(t)))  # (n, T, V)


def _tied_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")


@pytest.mark.parametrize("head_first", [False, True], ids=["embedding-first", "head-first"])
def test_a_tied_embedding_adds_both_parts_and_the_factored_form_refuses_it(head_first):
    # each layer's factors hold one part of the tied gradient: norms from them would miss the
    # cross term (they did, silently); the materialized gradients add the parts
    model = TiedLM(head_first).double()
    t, targets = tokens(), tokens()
    names = [name for name, _ in model.named_parameters()]
    expected = dict(zip(names, torch_func_per_example_grads(model, _tied_loss, t, targets)))
    with PerExampleGradients(model, "sum") as pe:
        _tied_loss(model(t), targets).backward()
        for name in names:
            torch.testing.assert_close(pe.grads[name], expected[name], **F64, msg=name)
        flat = torch.cat([g.flatten(1) for g in expected.values()], dim=1)
        torch.testing.assert_close(gradient_norms(pe.grads), flat.norm(dim=1), **F64)
        later, first = ("'tokens'", "'head'") if head_first else ("'head'", "'tokens'")
        message = f"{later} shares its weight with {first}.*use recorder.grads"
        with pytest.raises(ValueError, match=message):
            recorded_factors(pe)
        with pytest.raises(ValueError, match=message):
            pe.backward_with_norms(_tied_loss(model(t), targets))


def test_out_proj_is_claimed_by_the_attention_rule_not_recorded_alone():
    _, pe, expected = setup(CASES[14], "sum")
    assert "layer.out_proj" not in pe.layers and "layer" in pe.layers
    assert pe.grads["layer.out_proj.weight"].abs().sum() > 0
    torch.testing.assert_close(
        pe.grads["layer.out_proj.weight"], expected["layer.out_proj.weight"], **F64
    )


class UnexpandedPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, 1)

    def forward(self, x):
        return self.head(self.tok(x) + self.pos(torch.arange(x.shape[1])))


class MergedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 1)

    def forward(self, x):
        n, t, d = x.shape
        return self.lin(x.reshape(n * t, d)).reshape(n, t)


class AttentionWeightsInLoss(nn.Module):
    def __init__(self, mask=None):
        super().__init__()
        self.mha, self.mask = nn.MultiheadAttention(D, 2, batch_first=True), mask

    def forward(self, x):
        out, weights = self.mha(x, x, x, attn_mask=self.mask)
        return out.sum() + (weights.sum() if self.mask is None else 0)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Embedding(V, D, max_norm=1.0), r"max_norm=1.0.*renormalizes.*max_norm=None"),
        (nn.Embedding(V, D, sparse=True), r"sparse=True.*sparse=False"),
        (nn.Embedding(V, D, scale_grad_by_freq=True), r"scale_grad_by_freq=True.*mixes the"),
    ],
    ids=["max-norm", "sparse", "scale-grad-by-freq"],
)
def test_embedding_settings_are_refused_on_enter(module, message):
    with pytest.raises(ValueError, match=message), PerExampleGradients(Pool(module)):
        pass


class SequenceFirstEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` in its default sequence-first layout, fed ``(T, n, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, T, D)
        return self.head(self.encoder(x.transpose(0, 1)).mean(dim=0))


def test_a_sequence_first_layout_is_refused_with_the_batch_first_fix():
    model = SequenceFirstEncoder()
    with PerExampleGradients(model, "sum"), pytest.raises(
        ValueError, match=r"got 5 examples.*input has 4: the batch is on dimension 1.*batch_first"
    ):  # fmt: skip
        model(torch.randn(N, T, D))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.RNN(D, D, batch_first=True), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0].mean(dim=1))


def test_a_module_the_fallback_cannot_vmap_is_named_with_what_to_do():
    # nn.RNN has no rule; torch.func has no batching for its forward, and says so obscurely
    model = Recurrent()
    with PerExampleGradients(model, "sum") as pe:
        model(torch.randn(N, T, D)).sum().backward()
        with pytest.raises(RuntimeError, match=r"RNN has no rule of its own.*vmap.*register_rule"):
            pe.grads  # noqa: B018


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (UnexpandedPositions(), tokens(),
         r"Embedding 'pos' got 5 examples.*model's input has 4.*Expand positions to \(n, T\)"),
        (MergedBatch(), torch.randn(N, T, D),
         r"Linear 'lin' got 20 examples.*model's input has 4.*\(n \* T, d\)"),
    ],
    ids=["unexpanded-positions", "merged-batch"],
)  # fmt: skip
def test_calls_without_the_batch_dimension_are_refused(model, x, message):
    with PerExampleGradients(model), pytest.raises(ValueError, match=message):
        model(x)


def test_attention_weights_reaching_the_loss_are_refused():
    model = AttentionWeightsInLoss()
    with PerExampleGradients(model), pytest.raises(ValueError, match="output 1 .*need_weights"):
        model(torch.randn(N, T, D)).backward()


def test_three_dimensional_attention_mask_is_refused():
    model = AttentionWeightsInLoss(mask=torch.zeros(N * 2, T, T, dtype=torch.bool))
    with PerExampleGradients(model) as pe:
        model(torch.randn(N, T, D)).backward()
    with pytest.raises(ValueError, match=r"3-d attn_mask.*\(L, S\)"):
        _ = pe.grads


FACTORED_MHA = [
    "mha-batch-first", "mha-seq-first", "mha-cross-same-dim", "mha-kdim-vdim",
    "mha-no-bias-float-padding", "mha-is-causal", "mha-dropout-eval", "tiny-lm",
]  # fmt: skip


@pytest.mark.parametrize("name", FACTORED_MHA)
def test_attention_takes_the_factored_route_and_agrees_with_vmap(name):
    from goodfellow.layers.attention import AttentionGradients
    from goodfellow.layers.fallback import FallbackRule

    case = next(c for c in CASES if c.name == name)
    model, pe, expected = setup(case, "sum")
    record = next(r for r in pe.layers.values() if isinstance(r.module, nn.MultiheadAttention))
    layer = record.gradients()
    assert isinstance(layer, AttentionGradients)
    calls = list(zip(record.args, record.kwargs))
    vmapped = FallbackRule.gradients(
        record.rule, record.module, record.inputs, record.per_example_grad_outputs, calls
    )
    assert layer.names == vmapped.names
    for got, want in zip(layer.per_example(), vmapped.per_example()):
        torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(layer.sq_norms(), vmapped.sq_norms(), **F64)


def test_attention_with_dropout_in_training_mode_is_refused():
    model = Pool(nn.MultiheadAttention(D, 2, dropout=0.1, batch_first=True), prepare=_mha_first)
    model = model.double()
    with PerExampleGradients(model) as pe:
        model(floats(N, T, D)()).square().sum().backward()
    with pytest.raises(ValueError, match=r"dropout=0.1 in training mode.*Train it with dropout=0"):
        _ = pe.grads
