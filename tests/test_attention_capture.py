"""Recording inside ``nn.MultiheadAttention`` (:mod:`goodfellow.layers.attention_capture`).

The captured forward must be torch's own to the last bit (output, attention weights and every
gradient compared with ``torch.equal``), the recorder must take its projections from it (no
recomputation) and get torch.func's per-example gradients, the calls it does not cover must run
torch's function unchanged, and a forward that raises must leave no function mode behind.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from goodfellow import PerExampleGradients, torch_func_per_example_grads
from goodfellow.layers.attention import AttentionGradients
from goodfellow.layers.attention_capture import AttentionCapture
from tests.conftest import TOLERANCES
from tests.test_compositions import naive_penalty_gradient

F64 = TOLERANCES[torch.float64]
N, L, S, E = 3, 5, 4, 8


@dataclass
class Setting:
    """One way of calling the module: its constructor arguments and the call's."""

    name: str
    module: dict = field(default_factory=dict)
    call: dict = field(default_factory=dict)
    source: str = "self"  # "self": q = k = v; "cross": k, v of their own; "kv": k = v only
    captured: bool = True


def _causal(length: int, source: int) -> torch.Tensor:
    return torch.ones(length, source, dtype=torch.bool).triu(1)


SETTINGS = [
    Setting("self"),
    Setting("seq-first", module={"batch_first": False}),
    Setting("need-weights", call={"need_weights": True}),
    Setting("need-weights-per-head", call={"need_weights": True, "average_attn_weights": False}),
    Setting("no-bias", module={"bias": False}),
    Setting("bool-mask", call={"attn_mask": _causal(L, L)}),
    Setting("bool-mask-need-weights", call={"attn_mask": _causal(L, L), "need_weights": True}),
    Setting("float-mask", call={"attn_mask": torch.linspace(-1, 1, L * L).view(L, L)}),
    Setting("is-causal", call={"attn_mask": _causal(L, L), "is_causal": True}),
    Setting("padding", call={"key_padding_mask": torch.tensor([[False] * (L - 1) + [True]] * N)}),
    Setting("padding-and-mask", call={"key_padding_mask": torch.zeros(N, L),
                                      "attn_mask": _causal(L, L).float() * -1e9}),
    Setting("cross", source="cross"),
    Setting("cross-seq-first", module={"batch_first": False}, source="cross"),
    Setting("kdim-vdim", module={"kdim": 6, "vdim": 7}, source="cross"),
    Setting("kdim-vdim-need-weights", module={"kdim": 6, "vdim": 7}, source="cross",
            call={"need_weights": True}),
    Setting("dropout-eval", module={"dropout": 0.5}),
    Setting("key-is-value", source="kv"),  # torch's two-block layout: q, then [k v]
    Setting("key-is-value-seq-first-no-bias", module={"batch_first": False, "bias": False},
            source="kv"),
    Setting("key-is-value-padding", source="kv",
            call={"key_padding_mask": torch.tensor([[False] * (S - 1) + [True]] * N)}),
    # what the capture leaves to torch's own function (and the rule to its recomputation)
    Setting("bias-kv", module={"add_bias_kv": True}, captured=False),
    Setting("zero-attn", module={"add_zero_attn": True}, captured=False),
]  # fmt: skip


def build(setting: Setting, dtype: torch.dtype = torch.float64):
    """The module, in train mode unless it has dropout, and its query, key and value."""
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, 2, **{"batch_first": True, **setting.module}).to(dtype)
    if module.dropout:
        module.eval()
    first = module.batch_first

    def shaped(length: int, width: int) -> torch.Tensor:
        x = torch.randn(N, length, width, dtype=dtype)
        return x if first else x.transpose(0, 1)

    query = shaped(L, E)
    if setting.source == "self":
        return module, (query, query, query)
    key = shaped(S, setting.module.get("kdim", E))
    value = key if setting.source == "kv" else shaped(S, setting.module.get("vdim", E))
    return module, (query, key, value)


def run(module, inputs, call, capture=None):
    """Output, attention weights, every parameter's gradient and the inputs' gradients."""
    module.zero_grad(set_to_none=True)
    dtype = inputs[0].dtype
    call = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in call.items()}  # fmt: skip
    leaves = {id(t): t.detach().clone().requires_grad_() for t in inputs}
    args = [leaves[id(t)] for t in inputs]
    if capture is None:
        out, weights = module(*args, **call)
    else:
        with capture:
            out, weights = module(*args, **call)
    (out.square().sum() + (0 if weights is None else weights.sum())).backward()
    grads = [p.grad for p in module.parameters()] + [a.grad for a in leaves.values()]
    return [out, weights, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_the_captured_forward_is_torchs_own_to_the_last_bit(setting, dtype):
    module, inputs = build(setting, dtype)
    expected = run(module, inputs, setting.call)
    capture = AttentionCapture()
    got = run(module, inputs, setting.call, capture)
    assert (capture.core_output is not None) == setting.captured
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g is None and e is None) or torch.equal(g, e)


class Around(nn.Module):
    """Batch-first inputs in, the attention of the setting, a scalar per example out."""

    def __init__(self, setting: Setting):
        super().__init__()
        self.setting = setting
        self.attention, (q, k, v) = build(setting)
        self.first = self.attention.batch_first
        self.key = None if setting.source == "self" else nn.Linear(E, k.shape[-1]).double()
        self.value = nn.Linear(E, v.shape[-1]).double() if setting.source == "cross" else None

    def forward(self, x):  # (n, L, E)
        memory = x[:, :S].flip(1)  # (n, S, E)
        key = x if self.key is None else torch.tanh(self.key(memory))
        value = key if self.value is None else self.value(memory)
        q, k, v = (t if self.first else t.transpose(0, 1) for t in (x, key, value))
        call = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in self.setting.call.items()}  # fmt: skip
        if "key_padding_mask" in call:  # the same row for every example: one per example here
            call["key_padding_mask"] = call["key_padding_mask"][: x.shape[0]]
        out = self.attention(q, k, v, **call)[0]
        out = out if self.first else out.transpose(0, 1)  # (n, L, E)
        return torch.tanh(out).mean(dim=1)  # (n, E)


RECORDED = [s for s in SETTINGS if not s.call.get("need_weights")]  # weights unused there


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_recorded_attention_is_taken_from_the_capture_and_matches_torch_func(setting, reduction):
    model = Around(setting)
    x = torch.randn(N, L, E, dtype=torch.float64)
    y = torch.randn(N, E, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    with PerExampleGradients(model, loss_reduction=reduction) as pe:
        loss_fn(model(x), y).backward()
    record = pe.layers["attention"]
    captures = [record._call(c).capture for c in range(record.num_calls)]
    assert all(c is not None and c.complete for c in captures) == setting.captured
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    for name, value in expected.items():
        torch.testing.assert_close(pe.grads[name], value, **F64)
    scale = 1.0 / N if reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(pe.grads[name].sum(dim=0) * scale, p.grad, **F64)
    if setting.captured and not setting.module.get("add_bias_kv"):
        # the recomputed route, given the same records without the captures, agrees
        layer = record.gradients()
        calls = list(zip(record.args, record.kwargs))
        deltas = record.per_example_grad_outputs
        recomputed = record.rule.gradients(record.module, record.inputs, deltas, calls=calls)
        assert isinstance(layer, AttentionGradients) and isinstance(recomputed, AttentionGradients)
        for got, want in zip(layer.per_example(), recomputed.per_example()):
            torch.testing.assert_close(got, want, **F64)


def test_a_forward_that_raises_inside_the_attention_leaves_no_function_mode_behind():
    model = Around(SETTINGS[0]).float()
    with PerExampleGradients(model) as pe:
        with pytest.raises(AssertionError, match="embedding dimension"):
            model(torch.randn(N, L, E + 1))  # the wrong width: torch's own check raises
        assert not torch.overrides._get_current_function_mode_stack()
        model(torch.randn(N, L, E)).sum().backward()
        assert not torch.overrides._get_current_function_mode_stack()
    assert pe.grads["attention.in_proj_weight"].shape == (N, 3 * E, E)


def test_a_forward_nobody_differentiates_frees_its_graph_with_the_capture():
    model = Around(SETTINGS[0]).float()
    kept = []
    model.attention.register_forward_pre_hook(lambda m, args: kept.append(weakref.ref(args[0])))
    with PerExampleGradients(model):
        for _ in range(3):
            model(torch.randn(N, L, E, requires_grad=True).tanh())  # saved by the graph
        assert all(ref() is None for ref in kept)


def test_after_the_backward_the_capture_holds_no_tensor_of_the_graph():
    """It is kept until the next batch: an output it held would keep that output's memory."""
    model = Around(SETTINGS[0]).float()
    with PerExampleGradients(model) as pe:
        model(torch.randn(N, L, E)).sum().backward()
    capture = pe.layers["attention"]._call(0).capture
    assert capture.complete and not capture.outputs
    held = [*capture.inputs, capture.core_output, *capture.grad_outputs]
    assert all(t.grad_fn is None and not t.requires_grad for t in held)


def test_no_capture_for_a_module_whose_parts_are_frozen_and_none_under_no_grad():
    setting = SETTINGS[0]
    module, _ = build(setting)
    module.in_proj_weight.requires_grad_(False)
    assert module.in_proj_weight is not None
    from goodfellow.layers.base import rule_for

    assert rule_for(module).capture(module) is None  # the factored route does not apply
    model = Around(setting)
    with PerExampleGradients(model) as pe, torch.no_grad():
        model(torch.randn(N, L, E, dtype=torch.float64))
    assert pe.layers["attention"].num_calls == 0
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize("name", ["self", "kdim-vdim", "key-is-value"])
def test_per_example_gradients_are_written_into_given_buffers(name):
    """Self-attention's blocks write straight into them; the others stack their rows there."""
    setting = next(s for s in SETTINGS if s.name == name)
    model = Around(setting)
    x = torch.randn(N, L, E, dtype=torch.float64)
    with PerExampleGradients(model) as pe:
        model(x).square().sum().backward()
    out = {k: torch.full_like(v, float("nan")) for k, v in pe.grads.items()}
    got = pe.compute_grads(out=out)
    for key, value in pe.grads.items():
        assert got[key] is out[key] and torch.equal(got[key], value)


@pytest.mark.parametrize("name", ["self", "seq-first", "key-is-value"])
def test_under_autocast_the_gradients_are_those_of_the_bfloat16_forward(name):
    """Captured (or recomputed) in the dtype the forward ran in; results in the parameters'."""
    from tests.test_hooks import naive_under_autocast

    setting = next(s for s in SETTINGS if s.name == name)
    model = Around(setting).float()
    x, y = torch.randn(N, L, E), torch.randn(N, E)
    loss_fn = nn.MSELoss(reduction="sum")
    expected = naive_under_autocast(model, x, y, loss_fn)
    with PerExampleGradients(model) as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss_fn(output.float(), y).backward()
    for key, want in expected.items():
        assert pe.grads[key].dtype == torch.float32
        # bfloat16 products of the batch against those of one example: a rounding or two
        # apart (the captured route matched exactly when this was written, the recomputed
        # one to 0.2% of the largest entry)
        tolerance = {"rtol": 0.0, "atol": 2**-7 * want.abs().max().item()}
        torch.testing.assert_close(pe.grads[key], want, **tolerance, msg=key)


def test_two_recorders_on_one_model_both_get_the_gradients_and_leave_no_mode():
    """The later recorder's capture sees the call; the earlier one recomputes, same numbers."""
    model = Around(SETTINGS[0])
    x = torch.randn(N, L, E, dtype=torch.float64)
    y = torch.randn(N, E, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    with PerExampleGradients(model) as first, PerExampleGradients(model) as second:
        loss_fn(model(x), y).backward()
        assert not torch.overrides._get_current_function_mode_stack()
    names = [name for name, _ in model.named_parameters()]
    expected = dict(zip(names, torch_func_per_example_grads(model, loss_fn, x, y)))
    for pe in (first, second):
        for name, value in expected.items():
            torch.testing.assert_close(pe.grads[name], value, **F64)


REFUSED_CALLS = {
    "mask-of-one-row": {"attn_mask": torch.zeros(1, L)},  # would broadcast, torch refuses it
    "mask-too-long": {"attn_mask": torch.zeros(L, L + 1)},
    "padding-too-long": {"key_padding_mask": torch.zeros(N, L + 1, dtype=torch.bool)},
    "padding-one-row": {"key_padding_mask": torch.zeros(1, L, dtype=torch.bool)},
}


@pytest.mark.parametrize("call", REFUSED_CALLS.values(), ids=list(REFUSED_CALLS))
def test_calls_torch_refuses_get_torchs_own_error_under_the_capture(call):
    module, inputs = build(SETTINGS[0])
    with pytest.raises(Exception) as plain:
        run(module, inputs, call)
    capture = AttentionCapture()
    with pytest.raises(type(plain.value)) as captured:
        run(module, inputs, call, capture)
    assert str(captured.value) == str(plain.value) and capture.core_output is None


class AttentionWithWeights(nn.Module):
    """Self-attention through the explicit softmax (``need_weights=True``, weights unused),
    which, unlike the fused kernel, autograd differentiates twice."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.attention(x, x, x, need_weights=True)[0]))


def test_results_of_a_create_graph_backward_are_differentiable():
    # the factored route reads projections captured without their graph: results that must
    # stay differentiable come from vmap's route, and a gradient penalty through them is exact
    torch.manual_seed(0)
    model = AttentionWithWeights().double()
    x, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    expected = naive_penalty_gradient(model, x, y, loss_fn)
    params = list(model.parameters())
    with PerExampleGradients(model, "sum") as pe:
        torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        penalty = sum(g.square().sum() for g in pe.grads.values())
    for (name, want), got in zip(expected.items(), torch.autograd.grad(penalty, params)):
        torch.testing.assert_close(got, want, **F64, msg=name)
