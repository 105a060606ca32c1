"""CABS and AdaptiveBatchSampler at the edges a user meets: warm-up from lr = 0, NumPy numbers,
the unbiased estimate's smallest batch, a model or frozen parameters passed by mistake, len().

References are closed forms for hand-made gradients (two examples whose variance trace and loss
are 1, so the rule's raw size is lr) and the sampler's own iteration.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from goodfellow import CABS, MLP, AdaptiveBatchSampler, clip_to_norm, clipped_mean


def _unit_problem():
    """One parameter and two examples with tr Sigma = 1 and mean loss 1: the raw size is lr."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    grads = [torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)]  # mean (1, 0)
    losses = torch.tensor([0.5, 1.5], dtype=torch.float64)
    return param, grads, losses


# --------------------------------------------------------------------------------------------
# lr = 0


def test_a_warm_up_from_lr_zero_steps_along_the_schedule():
    """LambdaLR(s / 100) sets lr = 0 before the first step; torch's optimizers take it."""
    param, grads, losses = _unit_problem()
    base_lr = 500.0
    cabs = CABS([param], base_lr, bounds=(2, 100), decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(cabs, lambda s: s / 100)
    position = 0.0
    for step in range(4):
        lr = base_lr * step / 100  # 0, 5, 10, 15
        assert cabs.param_groups[0]["lr"] == pytest.approx(lr)
        size = cabs.step(losses, grads)
        position -= lr * 1.0  # SGD along the mean gradient (1, 0)
        # the rule: ceil(lr * 1 / 1), clipped to the bounds; lr = 0 asks for the smallest
        assert size == cabs.batch_size == max(2, math.ceil(lr))
        torch.testing.assert_close(
            param.detach(), torch.tensor([position, 0.0], dtype=torch.float64)
        )
        scheduler.step()
    assert cabs.state["cabs"]["steps"] == 4


def test_lr_zero_keeps_the_parameters_and_updates_the_running_averages():
    param, grads, losses = _unit_problem()
    cabs = CABS([param], 0.0, bounds=(3, 10), decay=0.5)
    assert cabs.step(losses, grads) == 3
    assert torch.equal(param.detach(), torch.zeros(2, dtype=torch.float64))
    state = cabs.state["cabs"]
    assert (state["variance_avg"], state["loss_avg"]) == (0.5 * 0.0 + 0.5, 0.5 * 1.0 + 0.5)


@pytest.mark.parametrize("where", ["construction", "step"])
def test_a_negative_lr_is_still_refused(where):
    param, grads, losses = _unit_problem()
    if where == "construction":
        with pytest.raises(ValueError, match="lr must be a non-negative finite number"):
            CABS([param], -0.1)
        return
    cabs = CABS([param], 1.0, (1, 10))
    cabs.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be a non-negative finite number, got -1"):
        cabs.step(losses, grads)
    assert param.grad is None


# --------------------------------------------------------------------------------------------
# unbiased needs batches of at least 2


def test_unbiased_with_a_smallest_batch_of_one_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"unbiased=True.*at least 2 examples.*bounds \(1, 8\)"):
        CABS([nn.Parameter(torch.zeros(2))], 1.0, bounds=(1, 8), unbiased=True)


def test_unbiased_with_a_smallest_batch_of_two_steps_with_n_minus_one():
    param, grads, losses = _unit_problem()
    cabs = CABS([param], 1.0, bounds=(2, 8), decay=0.0, unbiased=True)
    cabs.step(losses, grads)
    # two examples (2, 0) and (0, 0): the unbiased trace is |a - b|^2 / 2 = 2
    assert cabs.last_variance == pytest.approx(2.0, rel=1e-12)


# --------------------------------------------------------------------------------------------
# A model, or frozen parameters, passed by mistake


def test_a_model_is_refused_with_what_to_pass_instead():
    with pytest.raises(TypeError, match=r"not the model \(MLP\).*model\.parameters\(\)"):
        CABS(MLP(3, [4], 2), lr=0.1)


@pytest.mark.parametrize("named", [True, False])
def test_a_frozen_parameter_is_named_as_frozen(named):
    model = MLP(3, [4], 2)
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    name = next(iter(model.named_parameters()))[0]
    params = model.named_parameters() if named else model.parameters()
    where = repr(name) if named else "at position 0"
    with pytest.raises(ValueError, match=rf"parameter {where} is frozen \(requires_grad=False\)"):
        CABS(params, lr=0.1)


def test_a_parameter_frozen_after_construction_is_named_as_frozen_at_the_step():
    model = MLP(3, [4], 2).double()
    cabs = CABS(model.named_parameters(), lr=0.1, bounds=(1, 8))
    first = next(iter(model.named_parameters()))[0]
    dict(model.named_parameters())[first].requires_grad_(False)
    grads = {
        name: torch.zeros(2, *p.shape, dtype=torch.float64)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    with pytest.raises(ValueError, match=rf"missing \['{first}'\].*were frozen"):
        cabs.step(torch.ones(2, dtype=torch.float64), grads)


def test_trainable_named_parameters_of_a_partly_frozen_model_are_accepted():
    model = MLP(3, [4], 2).double()
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    cabs = CABS(trainable, lr=0.1, bounds=(1, 8))
    grads = {name: torch.ones(2, *p.shape, dtype=torch.float64) for name, p in trainable}
    cabs.step(torch.ones(2, dtype=torch.float64), grads)
    for _, p in trainable:
        torch.testing.assert_close(p.grad, torch.ones_like(p))


# --------------------------------------------------------------------------------------------
# NumPy numbers are numbers


def test_numpy_numbers_configure_cabs_like_python_numbers():
    runs = []
    for kind in (np.asarray, lambda v: v):
        param, grads, losses = _unit_problem()
        as_number = (lambda v: np.float32(v)) if kind is np.asarray else float
        as_int = (lambda v: np.int64(v)) if kind is np.asarray else int
        cabs = CABS(
            [param],
            as_number(20.5),
            bounds=(as_int(2), as_int(100)),
            decay=as_number(0.5),
            initial_batch_size=as_int(4),
        )
        assert isinstance(cabs.batch_size, int) and cabs.batch_size == 4
        sizes = [cabs.step(losses, grads) for _ in range(3)]
        runs.append((sizes, param.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_a_numpy_learning_rate_written_by_a_scheduler_is_accepted():
    param, grads, losses = _unit_problem()
    cabs = CABS([param], 1.0, (1, 100), decay=0.0)
    cabs.param_groups[0]["lr"] = np.float64(7.0)
    assert cabs.step(losses, grads) == 7


@pytest.mark.parametrize("source", [np.int64(4), np.int32(4), lambda: np.int64(4)])
def test_the_sampler_takes_numpy_integers(source):
    sampler = AdaptiveBatchSampler(np.int64(10), source, epochs=np.float32(2.0))
    batches = list(sampler)
    assert [len(batch) for batch in batches] == [4] * 5
    assert all(isinstance(i, int) for batch in batches for i in batch)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.int64(0), 4), ValueError, r"num_examples must be a positive integer"),
        ((np.float64(10.0), 4), ValueError, r"num_examples must be a positive integer"),
        ((10, np.float64(4.0)), TypeError, r"batch_size must be an int"),
        ((10, np.bool_(True)), TypeError, r"batch_size must be an int"),
        ((10, np.int64(0)), ValueError, r"positive integer, got (np\.int64\()?0"),
    ],
    ids=["zero", "float_examples", "float_batch", "numpy_bool", "zero_batch"],
)
def test_the_sampler_still_refuses_numpy_values_that_are_not_sizes(args, error, match):
    with pytest.raises(error, match=match):
        AdaptiveBatchSampler(*args)


def test_clipping_norms_may_be_numpy_numbers():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    for max_norm in (np.float32(1.0), np.float64(1.0), np.int64(1)):
        for got, want in zip(clipped_mean(grads, max_norm), clipped_mean(grads, 1.0)):
            assert torch.equal(got, want)
        flat = torch.cat([g.flatten(1) for g in grads], dim=1)
        assert torch.equal(clip_to_norm(max_norm)(flat), clip_to_norm(1.0)(flat))
    for bad in (np.bool_(True), True, "1.0"):
        with pytest.raises(TypeError, match="max_norm must be a positive number"):
            clipped_mean(grads, bad)


# --------------------------------------------------------------------------------------------
# len() of the sampler and of a DataLoader built on it


@given(
    num_examples=st.integers(1, 40),
    size=st.integers(1, 60),
    epochs=st.sampled_from([1, 2, 0.5, 0.1, 2.7, 1 / 3]),
)
def test_len_is_the_number_of_batches_drawn_at_a_fixed_size(num_examples, size, epochs):
    sampler = AdaptiveBatchSampler(
        num_examples, size, epochs=epochs, generator=torch.Generator().manual_seed(0)
    )
    assert len(sampler) == len(list(sampler))
    dataset = torch.utils.data.TensorDataset(torch.arange(float(num_examples)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(list(loader)) == len(sampler)


def test_len_of_one_epoch_is_the_ceiling_and_follows_the_current_size():
    param, grads, losses = _unit_problem()
    cabs = CABS([param], 20.0, bounds=(3, 64), decay=0.0)
    sampler = AdaptiveBatchSampler(100, cabs, epochs=1)
    assert len(sampler) == math.ceil(100 / 3)  # the initial batch size, bounds[0]
    cabs.step(losses, grads)  # asks for ceil(20) = 20
    assert len(sampler) == 5
    assert len(torch.utils.data.DataLoader(range(100), batch_sampler=sampler)) == 5


def test_len_of_an_endless_sampler_says_why_there_is_none():
    sampler = AdaptiveBatchSampler(10, 4)
    with pytest.raises(TypeError, match=r"epochs=None.*no length.*pass epochs"):
        len(sampler)
