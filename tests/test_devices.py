"""Nothing is left on the CPU: the library and the benchmark run on a device other than the CPU.

CI has no GPU, so ``--device cuda`` cannot run here. What can go wrong on a GPU that works on the
CPU is a tensor created without ``device=`` (on the CPU) and then mixed with the model's tensors.
PyTorch's ``meta`` device finds exactly that without a GPU: meta tensors have shapes, dtypes and a
device but no values, and an operation mixing a meta tensor with a CPU tensor raises, as one
mixing a CUDA tensor with a CPU tensor does.

Meta tensors cannot be read, so the routines that check values before they use them (finiteness
checks in ``EKFAC``, the gradiator and ``expected_transform``, the 0 / 0 check of
``gradient_noise_scale``) cannot run here; their tensors are created with the device of their
inputs, which the CPU tests exercise. ``clipped_mean`` skips its finiteness check on meta tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import goodfellow as gf
from benchmarks import methods as bm

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

META = torch.device("meta")


def test_mixing_a_meta_and_a_cpu_tensor_raises():
    # The premise of this file: if this stopped raising, the tests below would prove nothing.
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device=META) + torch.ones(3)


@pytest.fixture
def mlp_batch():
    torch.manual_seed(0)
    model = gf.MLP(5, [4, 3], 2).to(META)
    inputs = torch.randn(6, 5, device=META)  # (n, d_0)
    targets = torch.randint(2, (6,), device=META)  # (n,)
    prediction, activations, linear_combs = model(inputs)
    loss = nn.functional.cross_entropy(prediction, targets)
    linear_grads = torch.autograd.grad(loss, linear_combs)  # [(n, d_l), ...]
    return model, inputs, targets, [a.detach() for a in activations], linear_grads


def assert_on_meta(tensors, shapes):
    assert [t.device for t in tensors] == [META] * len(shapes)
    assert [tuple(t.shape) for t in tensors] == shapes


PARAM_SHAPES = [(6, 4, 5), (6, 4), (6, 3, 4), (6, 3), (6, 2, 3), (6, 2)]


def test_goodfellow_backprop_and_norms_stay_on_the_device(mlp_batch):
    model, inputs, targets, activations, linear_grads = mlp_batch
    assert_on_meta(gf.goodfellow_backprop(activations, linear_grads, "mean"), PARAM_SHAPES)
    buffers = [torch.empty(shape, device=META) for shape in PARAM_SHAPES]
    written = gf.goodfellow_backprop(activations, linear_grads, "mean", out=buffers)
    assert all(w is b for w, b in zip(written, buffers))
    assert_on_meta([gf.per_example_norms(activations, linear_grads, "mean")], [(6,)])
    grads = gf.per_example_grads(model, nn.CrossEntropyLoss(), inputs, targets)
    assert_on_meta(grads, PARAM_SHAPES)


def test_batched_outer_over_positions_stays_on_the_device():
    grad_outputs = torch.randn(4, 7, 3, device=META)  # (n, t, o)
    inputs = torch.randn(4, 7, 5, device=META)  # (n, t, i)
    assert_on_meta([gf.batched_outer(grad_outputs, inputs)], [(4, 3, 5)])


def test_factored_statistics_stay_on_the_device(mlp_batch):
    _, _, _, activations, linear_grads = mlp_batch
    factors = gf.mlp_factors(activations, linear_grads, "mean")
    assert_on_meta([gf.gradient_norms(factors)], [(6,)])
    assert_on_meta(gf.clipped_mean(factors, 1.0), [s[1:] for s in PARAM_SHAPES])
    for statistic in (gf.gradient_mean, gf.gradient_second_moment, gf.gradient_variance):
        assert_on_meta(statistic(factors), [s[1:] for s in PARAM_SHAPES])
    assert gf.gradient_variance_trace(factors).device == META
    # gradient_noise_scale reads the trace to refuse 0 / 0, so it cannot run on meta tensors
    assert all(part.device == META for part in gf.noise_scale_parts(factors))


@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_hooks_stay_on_the_device(reuse_buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(META)
    inputs = torch.randn(6, 5, device=META)
    targets = torch.randint(2, (6,), device=META)
    recorder = gf.PerExampleGradients(model, "mean", reuse_buffers=reuse_buffers).attach()
    for _ in range(2):  # the second batch writes into the first one's buffers when reused
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        grads = recorder.grads
        assert_on_meta(list(grads.values()), [(6, 4, 5), (6, 4), (6, 2, 4), (6, 2)])
    factors = gf.recorded_factors(recorder)
    assert_on_meta(gf.clipped_mean(list(factors.values()), 1.0), [(4, 5), (4,), (2, 4), (2,)])


def test_hooks_over_positions_stay_on_the_device():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(META)
    inputs = torch.randn(5, 7, 3, device=META)  # (n, t, d)
    recorder = gf.PerExampleGradients(model, "sum").attach()
    model(inputs).sum().backward()
    assert_on_meta(list(recorder.grads.values()), [(5, 4, 3), (5, 4), (5, 2, 4), (5, 2)])


DEVICE_CONFIGS = [
    bm.Config("deep-tiny", (3, 4, 4, 4, 2), 5),
    bm.Config("lm-tiny", (11, 8, 2, 2), 3, "tiny-lm", 5),
    bm.Config("lm-mha-tiny", (11, 8, 2, 2), 3, "tiny-lm-mha", 5),
]


# Opacus' ghost-clipping norm of an nn.Embedding calls unique(dim=0), whose output shape depends
# on the values, so it has no meta kernel: that peer is not run on the meta language model.
NO_META = {("lm-tiny", "opacus_ghost_clipping")}


@pytest.mark.parametrize(
    ("config", "name"),
    [
        (c, name)
        for c in DEVICE_CONFIGS
        for name in bm.methods_for(c)
        if (c.name, name) not in NO_META
    ],
    ids=lambda v: v.name if isinstance(v, bm.Config) else v,
)
def test_every_benchmark_method_runs_on_the_device(config, name):
    # What `python -m benchmarks.run --device cuda` runs, minus the checks that read values.
    problem = bm.Problem(config, device=META, reference=False)
    method = bm.METHODS[name](problem)
    for _ in range(2):
        method.reset()
        method.step()
    result = method.result()
    result = [result] if isinstance(result, torch.Tensor) else list(result)
    assert result and all(t.device == META for t in result)
