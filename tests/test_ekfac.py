"""KFAC and EKFAC against materialized per-example gradients and explicit dense matrices.

Every reference is built the slow, obvious way: per-example gradients from ``torch.func``, the
empirical Fisher as their mean outer product, approximations as dense Kronecker products and
their inverses by ``torch.linalg.solve``. Settings are a case list (layer widths, positions,
loss, reduction, bias, seed).
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from goodfellow import (
    EKFAC,
    KFAC,
    KroneckerEigenbasis,
    append_ones,
    batch_size_factor,
    dense_curvature,
    ekfac_scalings,
    join_weight_bias,
    kfac_factors,
    kfac_scalings,
    kronecker_eigenbasis,
    precondition,
    split_weight_bias,
    torch_func_per_example_grads,
)
from tests.conftest import TOLERANCES

F64 = TOLERANCES[torch.float64]


class Chain(nn.Module):
    """Linear layers with tanh between them; inputs may carry positions ``(n, T, d)``.

    The forward also returns every layer's input and output so the tests can read ``a`` and
    ``dLoss/dZ`` without any hook machinery. With positions, the last layer's output is averaged
    over them, so each example still has one prediction.
    """

    def __init__(self, widths: tuple[int, ...], bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out, bias=bias) for d_in, d_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, x):
        inputs, outputs = [], []
        h = x
        for index, layer in enumerate(self.layers):
            inputs.append(h)
            z = layer(h)
            outputs.append(z)
            h = torch.tanh(z) if index < len(self.layers) - 1 else z
        prediction = h.mean(1) if h.dim() == 3 else h
        return prediction, inputs, outputs


@dataclass(frozen=True)
class Case:
    """One setting: a chain of linear layers, a batch, a loss and its reduction."""

    widths: tuple[int, ...]
    batch: int
    loss: str
    reduction: str
    positions: int | None = None
    bias: bool = True
    seed: int = 0

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.widths))
        where = f"-T{self.positions}" if self.positions else ""
        return (
            f"{shape}-n{self.batch}{where}-{self.loss}-{self.reduction}"
            f"{'' if self.bias else '-nobias'}-seed{self.seed}"
        )

    def make(self, dtype: torch.dtype = torch.float64):
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        model = Chain(self.widths, bias=self.bias).to(dtype)
        middle = (self.positions,) if self.positions else ()
        # drawn in float64 and cast, so both precisions see the same numbers
        x = torch.randn(
            self.batch, *middle, self.widths[0], generator=generator, dtype=torch.float64
        )
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.widths[-1], (self.batch,), generator=generator)
            loss_fn = nn.CrossEntropyLoss(reduction=self.reduction)
        else:
            y = torch.randn(self.batch, self.widths[-1], generator=generator, dtype=torch.float64)
            loss_fn = nn.MSELoss(reduction=self.reduction)
        return model, x.to(dtype), y if y.dtype == torch.long else y.to(dtype), loss_fn


CASES = [
    Case(widths, batch, loss, reduction)
    for widths, batch, loss, reduction in itertools.product(
        [(3, 2), (5, 4, 3), (4, 6, 1, 3)], [1, 7, 40], ["mse", "cross_entropy"], ["sum", "mean"]
    )
] + [
    Case((3, 4, 2), 6, "mse", "mean", positions=5),
    Case((2, 3), 9, "cross_entropy", "sum", positions=3, seed=1),
    Case((4, 5, 3), 20, "cross_entropy", "mean", bias=False),
    Case((4, 5, 3), 5, "mse", "sum", positions=2, bias=False, seed=2),
]


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


@dataclass
class LayerRecord:
    """What one layer saw in one batch, and the references for it."""

    inputs: torch.Tensor  # ā, (n, ..., d_in + 1)
    grad_outputs: torch.Tensor  # per-example δ, (n, ..., d_out)
    per_example_grads: torch.Tensor  # joint weight, (n, d_out, d_in + 1), from torch.func
    batch_grad: torch.Tensor  # the joint weight's .grad, (d_out, d_in + 1)


@functools.cache  # cases are immutable and tests only read the records
def record(case: Case, dtype: torch.dtype = torch.float64) -> tuple[LayerRecord, ...]:
    """Run one batch: per layer ā, per-example δ, torch.func per-example grads, batch grad."""
    model, x, y, loss_fn = case.make(dtype)
    prediction, inputs, outputs = model(x)
    loss = loss_fn(prediction, y)
    output_grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    loss.backward()
    factor = batch_size_factor(case.reduction, case.batch)
    references = torch_func_per_example_grads(model, loss_fn, x, y)
    records = []
    for index, layer in enumerate(model.layers):
        if case.bias:
            weight_grads, bias_grads = references[2 * index], references[2 * index + 1]
            joint = torch.cat([weight_grads, bias_grads.unsqueeze(-1)], dim=-1)
            a = append_ones(inputs[index].detach())
        else:
            joint, a = references[index], inputs[index].detach()
        records.append(
            LayerRecord(
                inputs=a,
                grad_outputs=output_grads[index] * factor,
                per_example_grads=joint,
                batch_grad=join_weight_bias(
                    layer.weight.grad, layer.bias.grad if case.bias else None
                ),
            )
        )
    return tuple(records)


def empirical_fisher(per_example_grads: torch.Tensor) -> torch.Tensor:
    """E_n[vec g_n vec g_nᵀ] from materialized gradients, in torch.flatten order."""
    flat = per_example_grads.flatten(1)  # (n, P)
    return flat.T @ flat / flat.shape[0]  # (P, P)


def explicit_approximation(basis: KroneckerEigenbasis, scalings: torch.Tensor) -> torch.Tensor:
    """(U_G ⊗ U_A) diag(vec S) (U_G ⊗ U_A)ᵀ with kron and diag, for row-major vec."""
    Q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)
    return Q @ torch.diag(scalings.flatten()) @ Q.T


def layer_basis(layer: LayerRecord):
    A, G = kfac_factors(layer.inputs, layer.grad_outputs)
    return A, G, kronecker_eigenbasis(A, G)


# ---------------------------------------------------------------------------------------------
# The factors and the scalings


def test_factors_match_their_definition(case):
    for layer in record(case):
        A, G = kfac_factors(layer.inputs, layer.grad_outputs)
        a = layer.inputs.reshape(case.batch, -1, layer.inputs.shape[-1])  # (n, T, d_in + 1)
        delta = layer.grad_outputs.reshape(case.batch, -1, layer.grad_outputs.shape[-1])
        positions = a.shape[1]
        A_loop = sum(
            torch.outer(a[n, t], a[n, t]) for n in range(case.batch) for t in range(positions)
        )
        G_loop = sum(
            torch.outer(delta[n, t], delta[n, t])
            for n in range(case.batch)
            for t in range(positions)
        )
        # KFAC-expand: positions are averaged in A and summed in G
        torch.testing.assert_close(A, A_loop / (case.batch * positions), **F64)
        torch.testing.assert_close(G, G_loop / case.batch, **F64)


def test_grad_outputs_are_per_example_gradients(case):
    # the batch-size factor is right iff δ āᵀ (summed over positions) is example n's own gradient
    for layer in record(case):
        a = layer.inputs.reshape(case.batch, -1, layer.inputs.shape[-1])
        delta = layer.grad_outputs.reshape(case.batch, -1, layer.grad_outputs.shape[-1])
        rebuilt = torch.einsum("nto,nti->noi", delta, a)
        torch.testing.assert_close(rebuilt, layer.per_example_grads, **F64)


def test_scalings_equal_projected_per_example_gradients(case):
    for layer in record(case):
        _, _, basis = layer_basis(layer)
        U_A, U_G = basis.input_eigenvectors, basis.output_eigenvectors
        projected = U_G.T @ layer.per_example_grads @ U_A  # (n, d_out, d_in + 1)
        expected = projected.square().mean(0)
        torch.testing.assert_close(
            ekfac_scalings(layer.inputs, layer.grad_outputs, basis), expected, **F64
        )


def test_scalings_are_the_diagonal_of_the_fisher_in_the_eigenbasis(case):
    for layer in record(case):
        _, _, basis = layer_basis(layer)
        Q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)
        diagonal = torch.diagonal(Q.T @ empirical_fisher(layer.per_example_grads) @ Q)
        S = ekfac_scalings(layer.inputs, layer.grad_outputs, basis)
        torch.testing.assert_close(S.flatten(), diagonal, **F64)


def test_float32_scalings_within_stated_tolerance():
    case = Case((5, 4, 3), 40, "cross_entropy", "mean")
    for layer64, layer32 in zip(record(case, torch.float64), record(case, torch.float32)):
        _, _, basis = layer_basis(layer64)
        basis32 = KroneckerEigenbasis(*(t.float() for t in basis))
        got = ekfac_scalings(layer32.inputs, layer32.grad_outputs, basis32)
        want = ekfac_scalings(layer64.inputs, layer64.grad_outputs, basis)
        torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


def test_kfac_is_exact_for_a_single_example():
    # one example, no positions: E[δδᵀ ⊗ āāᵀ] = E[δδᵀ] ⊗ E[āāᵀ] trivially
    case = Case((4, 3, 2), 1, "cross_entropy", "sum", seed=3)
    for layer in record(case):
        A, G = kfac_factors(layer.inputs, layer.grad_outputs)
        torch.testing.assert_close(
            torch.kron(G, A), empirical_fisher(layer.per_example_grads), **F64
        )


def test_kfac_scalings_are_the_eigenvalues_of_the_kronecker_product(case):
    for layer in record(case):
        A, G, basis = layer_basis(layer)
        torch.testing.assert_close(
            dense_curvature(basis, kfac_scalings(basis)), torch.kron(G, A), **F64
        )


def test_dense_curvature_matches_explicit_kron(case):
    for layer in record(case):
        _, _, basis = layer_basis(layer)
        S = ekfac_scalings(layer.inputs, layer.grad_outputs, basis)
        torch.testing.assert_close(
            dense_curvature(basis, S), explicit_approximation(basis, S), **F64
        )


# ---------------------------------------------------------------------------------------------
# The paper's result: EKFAC is never further from the empirical Fisher than KFAC


@given(
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 4),
    batch=st.integers(1, 12),
    positions=st.sampled_from([None, 2, 3]),
    loss=st.sampled_from(["mse", "cross_entropy"]),
    seed=st.integers(0, 2**16),
)
def test_ekfac_is_never_further_from_the_fisher_than_kfac(
    d_in, d_out, batch, positions, loss, seed
):
    if loss == "cross_entropy":
        d_out = max(d_out, 2)
    case = Case((d_in, d_out), batch, loss, "mean", positions=positions, seed=seed)
    (layer,) = record(case)
    A, G, basis = layer_basis(layer)
    fisher = empirical_fisher(layer.per_example_grads)
    ekfac = explicit_approximation(basis, ekfac_scalings(layer.inputs, layer.grad_outputs, basis))
    kfac = torch.kron(G, A)
    ekfac_error = torch.linalg.matrix_norm(ekfac - fisher)
    kfac_error = torch.linalg.matrix_norm(kfac - fisher)
    assert ekfac_error <= kfac_error * (1 + 1e-10) + 1e-12, (ekfac_error, kfac_error)


# ---------------------------------------------------------------------------------------------
# Preconditioning


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_preconditioned_gradient_is_the_explicit_solve(case, damping):
    for layer in record(case):
        _, _, basis = layer_basis(layer)
        for scalings in (
            ekfac_scalings(layer.inputs, layer.grad_outputs, basis),
            kfac_scalings(basis),
        ):
            damped = explicit_approximation(basis, scalings) + damping * torch.eye(
                scalings.numel(), dtype=torch.float64
            )
            expected = torch.linalg.solve(damped, layer.batch_grad.flatten())
            got = precondition(layer.batch_grad, basis, scalings, damping)
            torch.testing.assert_close(got.flatten(), expected, **F64)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_preconditioning_is_the_damped_kronecker_inverse(case, damping):
    # no eigendecomposition in the reference: (G ⊗ A + λI)⁻¹ vec ĝ by a dense solve
    for layer in record(case):
        A, G, basis = layer_basis(layer)
        damped = torch.kron(G, A) + damping * torch.eye(
            G.shape[0] * A.shape[0], dtype=torch.float64
        )
        expected = torch.linalg.solve(damped, layer.batch_grad.flatten())
        got = precondition(layer.batch_grad, basis, kfac_scalings(basis), damping)
        torch.testing.assert_close(got.flatten(), expected, **F64)


def test_undamped_kfac_is_the_product_of_the_factor_inverses():
    # (G ⊗ A)⁻¹ vec ĝ = vec(G⁻¹ ĝ A⁻¹): with well-conditioned factors a tiny λ changes nothing
    case = Case((3, 4, 2), 64, "mse", "mean", seed=4)
    for layer in record(case):
        A, G, basis = layer_basis(layer)
        expected = torch.linalg.solve(G, layer.batch_grad) @ torch.linalg.inv(A)
        got = precondition(layer.batch_grad, basis, kfac_scalings(basis), 1e-14)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Small helpers


def test_append_ones_and_joint_weight_round_trip():
    a = torch.randn(4, 3, 2, dtype=torch.float64)
    a_bar = append_ones(a)
    assert a_bar.shape == (4, 3, 3)
    torch.testing.assert_close(a_bar[..., :2], a)
    assert (a_bar[..., 2] == 1).all()
    layer = nn.Linear(2, 5).double()
    joint = join_weight_bias(layer.weight, layer.bias)
    torch.testing.assert_close(append_ones(a) @ joint.T, layer(a))
    weight, bias = split_weight_bias(joint, has_bias=True)
    assert torch.equal(weight, layer.weight) and torch.equal(bias, layer.bias)
    assert join_weight_bias(layer.weight, None) is layer.weight
    batched = join_weight_bias(torch.randn(7, 5, 2), torch.randn(7, 5))  # per-example gradients
    assert batched.shape == (7, 5, 3)
    for i in range(7):
        weight_i, bias_i = split_weight_bias(batched, has_bias=True)
        torch.testing.assert_close(batched[i], join_weight_bias(weight_i[i], bias_i[i]))
    assert split_weight_bias(layer.weight, has_bias=False) == (layer.weight, None)


# ---------------------------------------------------------------------------------------------
# Bad input


def _small_basis():
    a, delta = (
        append_ones(torch.randn(6, 2, dtype=torch.float64)),
        torch.randn(6, 3, dtype=torch.float64),
    )
    return a, delta, kronecker_eigenbasis(*kfac_factors(a, delta))


@pytest.mark.parametrize("damping", [0.0, -1e-3, float("nan"), float("inf")])
def test_damping_must_be_positive_and_finite(damping):
    a, delta, basis = _small_basis()
    grad = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be positive"):
        precondition(grad, basis, kfac_scalings(basis), damping)


@pytest.mark.parametrize("damping", [True, "0.1", None])
def test_damping_must_be_a_number(damping):
    _, _, basis = _small_basis()
    with pytest.raises(TypeError, match="damping must be a positive number"):
        precondition(torch.zeros(3, 3, dtype=torch.float64), basis, kfac_scalings(basis), damping)


def test_shapes_are_checked():
    a, delta, basis = _small_basis()
    with pytest.raises(ValueError, match="every dimension but the last"):
        kfac_factors(a[:5], delta)
    with pytest.raises(ValueError, match="shape \\(n, ..., features\\)"):
        kfac_factors(a[0], delta[0])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        kfac_factors(a.tolist(), delta)
    with pytest.raises(ValueError, match="one dtype"):
        kfac_factors(a.float(), delta)
    with pytest.raises(ValueError, match="batch is empty"):
        kfac_factors(a[:0], delta[:0])
    with pytest.raises(ValueError, match="ones column"):
        ekfac_scalings(a[:, :2], delta, basis)
    with pytest.raises(ValueError, match="join_weight_bias"):
        precondition(torch.zeros(3, 2, dtype=torch.float64), basis, kfac_scalings(basis), 0.1)
    with pytest.raises(ValueError, match="square matrix"):
        kronecker_eigenbasis(torch.zeros(2, 3), torch.eye(2))


def test_types_and_dtypes_are_checked_before_any_matmul():
    a, delta, basis = _small_basis()
    A, G = kfac_factors(a, delta)
    grad, scalings = torch.randn(3, 3, dtype=torch.float64), ekfac_scalings(a, delta, basis)
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor, got torch.int64"):
        kfac_factors(a.long(), delta.long())
    with pytest.raises(TypeError, match="A must be a floating-point torch.Tensor, got list"):
        kronecker_eigenbasis(A.tolist(), G)
    with pytest.raises(TypeError, match="G must be a floating-point torch.Tensor, got a torch.int"):
        kronecker_eigenbasis(A, G.long())
    with pytest.raises(ValueError, match="A is torch.float32 on cpu but G is torch.float64"):
        kronecker_eigenbasis(A.float(), G)
    with pytest.raises(ValueError, match="inputs is torch.float32 on cpu but the basis is"):
        ekfac_scalings(a.float(), delta.float(), basis)
    with pytest.raises(ValueError, match="grad is torch.float32 on cpu but the basis is"):
        precondition(grad.float(), basis, scalings, 0.1)
    with pytest.raises(ValueError, match="scalings is torch.float32 on cpu but the basis is"):
        precondition(grad, basis, scalings.float(), 0.1)
    with pytest.raises(TypeError, match="grad must be a torch.Tensor, got list"):
        precondition(grad.tolist(), basis, scalings, 0.1)
    as_tuple = tuple(basis)
    for call in (
        lambda: ekfac_scalings(a, delta, as_tuple),
        lambda: kfac_scalings(as_tuple),
        lambda: precondition(grad, as_tuple, scalings, 0.1),
        lambda: dense_curvature(as_tuple, scalings),
    ):
        with pytest.raises(TypeError, match="basis must be a KroneckerEigenbasis"):
            call()
    with pytest.raises(ValueError, match=r"scalings must have the shape .* = \(3, 3\)"):
        dense_curvature(basis, scalings[:, :2])
    with pytest.raises(ValueError, match=r"bias of shape \(3,\) does not fit weight"):
        join_weight_bias(torch.randn(2, 3), torch.randn(3))


def test_an_asymmetric_factor_is_refused():
    """eigh reads one triangle: an asymmetric matrix would get the basis of another matrix."""
    A = torch.eye(3, dtype=torch.float64) + torch.triu(torch.ones(3, 3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="factor A is not symmetric"):
        kronecker_eigenbasis(A, torch.eye(2, dtype=torch.float64))
    # round-off asymmetry of a float32 second moment passes and gives the float64 basis
    a = append_ones(torch.randn(2000, 6))
    A32 = a.T @ a / a.shape[0]
    basis = kronecker_eigenbasis(A32, torch.eye(2))
    expected = torch.linalg.eigvalsh(a.double().T @ a.double() / a.shape[0])
    torch.testing.assert_close(
        basis.input_eigenvalues.double(), expected, **TOLERANCES[torch.float32]
    )


def test_negative_scalings_are_refused():
    """S + λ <= 0 would divide by zero or turn the step uphill."""
    a, delta, basis = _small_basis()
    scalings = ekfac_scalings(a, delta, basis).clone()
    scalings[0, 0] = -1.0
    with pytest.raises(ValueError, match="scalings must be non-negative.*minimum of -1"):
        precondition(torch.randn(3, 3, dtype=torch.float64), basis, scalings, 0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor_has_no_eigenbasis(bad):
    A = torch.eye(3, dtype=torch.float64)
    A[1, 1] = bad
    with pytest.raises(FloatingPointError, match="factor A has non-finite entries"):
        kronecker_eigenbasis(A, torch.eye(2, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="factor G has non-finite entries"):
        kronecker_eigenbasis(torch.eye(2, dtype=torch.float64), A)


# ---------------------------------------------------------------------------------------------
# The optimizer


@dataclass(frozen=True)
class OptimizerCase:
    """Settings of one optimizer run, compared step by step with the functional computation."""

    mode: str = "ekfac"
    update_freq: int = 2
    decay: float = 0.9
    reduction: str = "mean"
    positions: int | None = None
    bias: bool = True
    frozen_bias: bool = False
    loss: str = "cross_entropy"

    @property
    def id(self) -> str:
        return "-".join(f"{k}={v}" for k, v in self.__dict__.items())


OPTIMIZER_CASES = [
    OptimizerCase(mode=mode, update_freq=freq, decay=decay, reduction=reduction)
    for mode, freq, decay, reduction in itertools.product(
        ["ekfac", "kfac"], [1, 3], [0.0, 0.9], ["mean", "sum"]
    )
] + [
    OptimizerCase(positions=3),
    OptimizerCase(mode="kfac", positions=2, reduction="sum", loss="mse"),
    OptimizerCase(bias=False, loss="mse"),
    OptimizerCase(frozen_bias=True),
]


def functional_step(model, state, x, y, case, step, lr, damping):
    """The reference: one EKFAC/KFAC step of ``model`` (a Chain) written with the functions."""
    loss_fn = LOSSES[case.loss](reduction=case.reduction)
    prediction, inputs, outputs = model(x)
    output_grads = torch.autograd.grad(loss_fn(prediction, y), outputs, retain_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    param_grads = dict(zip(params, torch.autograd.grad(loss_fn(prediction, y), params)))
    factor = batch_size_factor(case.reduction, x.shape[0])
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            has_bias = layer.bias is not None and layer.bias.requires_grad
            a = append_ones(inputs[index]) if has_bias else inputs[index]
            delta = output_grads[index] * factor
            A, G = kfac_factors(a, delta)
            memory = state.setdefault(index, {})
            if step > 0:
                A = case.decay * memory["A"] + (1 - case.decay) * A
                G = case.decay * memory["G"] + (1 - case.decay) * G
            memory["A"], memory["G"] = A, G
            if step % case.update_freq == 0:
                memory["basis"] = kronecker_eigenbasis(A, G)
            basis = memory["basis"]
            if case.mode == "kfac":
                S = kfac_scalings(basis)
            else:
                S = ekfac_scalings(a, delta, basis)
                if step % case.update_freq != 0:
                    S = case.decay * memory["S"] + (1 - case.decay) * S
                memory["S"] = S
            grad = join_weight_bias(
                param_grads[layer.weight], param_grads.get(layer.bias) if has_bias else None
            )
            weight_step, bias_step = split_weight_bias(
                precondition(grad, basis, S, damping), has_bias
            )
            layer.weight -= lr * weight_step
            if has_bias:
                layer.bias -= lr * bias_step


LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}


def make_run(case: OptimizerCase, seed: int = 0):
    torch.manual_seed(seed)
    model = Chain((4, 6, 3), bias=case.bias).double()
    if case.frozen_bias:
        model.layers[0].bias.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    middle = (case.positions,) if case.positions else ()
    batches = []
    for n in (8, 8, 5, 8, 8):  # a smaller batch in between: statistics are means, not sums
        x = torch.randn(n, *middle, 4, generator=generator, dtype=torch.float64)
        if case.loss == "cross_entropy":
            y = torch.randint(0, 3, (n,), generator=generator)
        else:
            y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        batches.append((x, y))
    return model, batches


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=[c.id for c in OPTIMIZER_CASES])
def test_optimizer_step_equals_the_functional_computation(case):
    model, batches = make_run(case)
    reference = copy.deepcopy(model)
    lr, damping = 0.3, 1e-2
    optimizer = EKFAC(
        model,
        lr,
        damping,
        case.update_freq,
        decay=case.decay,
        mode=case.mode,
        loss_reduction=case.reduction,
    )
    loss_fn = LOSSES[case.loss](reduction=case.reduction)
    state: dict = {}
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss_fn(model(x)[0], y).backward()
        optimizer.step()
        functional_step(reference, state, x, y, case, step, lr, damping)
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, **F64)
        # Start the next step from identical parameters, so that round-off is not amplified
        # over steps (each step must agree, not the chaotic trajectory).
        with torch.no_grad():
            for got, want in zip(model.parameters(), reference.parameters()):
                want.copy_(got)
    if case.frozen_bias:
        torch.testing.assert_close(model.layers[0].bias, make_run(case)[0].layers[0].bias)


def test_kfac_class_is_ekfac_in_kfac_mode():
    case = OptimizerCase()
    model, batches = make_run(case)
    twin = copy.deepcopy(model)
    optimizers = [KFAC(model, 0.2, 1e-2, 2), EKFAC(twin, 0.2, 1e-2, 2, mode="kfac")]
    for x, y in batches:
        for net, optimizer in zip((model, twin), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x)[0], y).backward()
            optimizer.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)


def test_eigenbasis_is_refreshed_every_update_freq_steps():
    model, batches = make_run(OptimizerCase())
    optimizer = EKFAC(model, lr=0.1, damping=1e-2, update_freq=3)
    weight = model.layers[0].weight
    seen = []
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x)[0], y).backward()
        optimizer.step()
        seen.append(optimizer.state[weight]["input_eigenvectors"].clone())
    same = [torch.equal(before, after) for before, after in zip(seen, seen[1:])]
    assert same == [True, True, False, True]  # new bases at steps 0 and 3


def test_ekfac_and_kfac_train_faster_than_their_first_loss():
    torch.manual_seed(0)
    x = torch.randn(128, 5, dtype=torch.float64)
    y = torch.sin(2 * x[:, :2])
    for mode in ("ekfac", "kfac"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        optimizer = EKFAC(model, lr=0.03, damping=1e-2, update_freq=5, mode=mode)
        first = nn.functional.mse_loss(model(x), y).item()

        def closure(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(60):
            loss = optimizer.step(closure)
        assert loss.item() < 0.2 * first, (mode, first, loss.item())


def test_state_dict_round_trip_continues_identically():
    case = OptimizerCase()
    model, batches = make_run(case)
    optimizer = EKFAC(model, lr=0.2, damping=1e-2, update_freq=3)

    def train(net, opt, few):
        for x, y in few:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x)[0], y).backward()
            opt.step()

    train(model, optimizer, batches[:2])
    twin = copy.deepcopy(model)
    restored = EKFAC(twin, lr=0.2, damping=1e-2, update_freq=3)
    restored.load_state_dict(optimizer.state_dict())
    train(model, optimizer, batches[2:])
    train(twin, restored, batches[2:])
    for got, want in zip(twin.parameters(), model.parameters()):
        assert torch.equal(got, want)


def test_remove_hooks_leaves_no_hook():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    assert any(module._forward_hooks for module in model.modules())
    optimizer.remove_hooks()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    nn.functional.cross_entropy(
        model(torch.randn(5, 3)), torch.zeros(5, dtype=torch.long)
    ).backward()
    with pytest.raises(RuntimeError, match="hooks were removed"):
        optimizer.step()


def test_step_needs_a_new_batch_every_time():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    with pytest.raises(RuntimeError, match="no batch recorded"):
        optimizer.step()
    nn.functional.cross_entropy(
        model(torch.randn(5, 3)), torch.zeros(5, dtype=torch.long)
    ).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="no batch recorded"):
        optimizer.step()  # the same batch again would count twice in the running averages


def test_evaluation_forward_under_no_grad_does_not_disturb_a_step():
    case = OptimizerCase()
    model, batches = make_run(case)
    twin = copy.deepcopy(model)
    optimizers = [EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin)]
    x, y = batches[0]
    for net, optimizer in zip((model, twin), optimizers):
        nn.functional.cross_entropy(net(x)[0], y).backward()
        if net is model:
            with torch.no_grad():
                net(batches[1][0])
        optimizer.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)


def test_a_forward_that_misses_the_loss_does_not_enter_the_statistics():
    # A validation forward with gradients enabled and no backward joins the batch as an extra
    # call of every Linear; its output gets no gradient, so its inputs must not count in A.
    case = OptimizerCase()
    model, batches = make_run(case)
    twin = copy.deepcopy(model)
    optimizers = [EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin)]
    for x, y in batches[:3]:
        for net, optimizer in zip((model, twin), optimizers):
            optimizer.zero_grad()
            if net is model:
                net(torch.randn_like(x) * 3)  # (n, 4) of the same size, never used
            nn.functional.cross_entropy(net(x)[0], y).backward()
            optimizer.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_reported_and_nothing_changes(bad):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    optimizer = EKFAC(model, lr=0.1)
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(6, 3, dtype=torch.float64)
    x[2, 1] = bad
    loss = nn.functional.cross_entropy(model(x), torch.zeros(6, dtype=torch.long))
    loss.backward()
    with pytest.raises(FloatingPointError, match="Linear '0' has non-finite entries"):
        optimizer.step()
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)
    assert not optimizer.state


def test_non_finite_output_gradients_in_a_later_layer_change_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    optimizer = EKFAC(model, lr=0.1)
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(6, 3, dtype=torch.float64)
    output = model(x)
    # an infinite gradient enters at the output: layer '2' is reached first, layer '0' too
    (output * torch.tensor([[float("inf"), 1.0]], dtype=torch.float64)).sum().backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.step()
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.ReLU()), "no nn.Linear layer"),
        (nn.Sequential(nn.Conv1d(2, 2, 2, groups=2)), "no nn.Linear layer"),
        (nn.Linear(3, 3).requires_grad_(False), "no nn.Linear layer with trainable"),
    ],
    ids=["relu-only", "grouped-conv-only", "frozen"],
)
def test_models_ekfac_cannot_precondition_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        EKFAC(model, lr=0.1)


def test_tied_weights_are_refused():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    with pytest.raises(ValueError, match="shares a parameter with Linear '0'"):
        EKFAC(nn.Sequential(first, nn.Tanh(), second), lr=0.1)


class EmbeddingTiedToHead(nn.Module):
    def __init__(self, head_first: bool) -> None:
        super().__init__()
        modules = [("head", nn.Linear(3, 5, bias=False)), ("tokens", nn.Embedding(5, 3))]
        for name, module in modules if head_first else modules[::-1]:
            self.add_module(name, module)
        self.head.weight = self.tokens.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tokens(t)))


@pytest.mark.parametrize("head_first", [False, True])
def test_a_weight_tied_to_a_layer_ekfac_does_not_precondition_is_refused(head_first):
    # the embedding takes plain SGD steps, its tied output layer EKFAC's: one parameter, two
    # updates' worth of curvature that neither describes
    with pytest.raises(ValueError, match="Linear 'head' shares a parameter with Embedding"):
        EKFAC(EmbeddingTiedToHead(head_first), lr=0.1)


def test_a_linear_applied_twice_is_one_layer_with_more_positions():
    # the two calls are stacked like positions: statistics over both, one update of the weight
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    twice = nn.Sequential(layer, nn.Tanh(), layer)
    optimizer = EKFAC(twice, lr=0.1, damping=1e-2)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(layer)
    nn.functional.cross_entropy(twice(x), y).backward()
    optimizer.step()
    hidden = reference(x)
    prediction = reference(torch.tanh(hidden))
    loss = nn.functional.cross_entropy(prediction, y)
    grads = torch.autograd.grad(loss, [hidden, prediction, reference.weight, reference.bias])
    with torch.no_grad():
        a = torch.stack([append_ones(x), append_ones(torch.tanh(hidden))], dim=1)  # (n, 2, 4)
        delta = torch.stack([grads[0], grads[1]], dim=1) * 6  # (n, 2, 3)
        basis = kronecker_eigenbasis(*kfac_factors(a, delta))
        S = ekfac_scalings(a, delta, basis)
        step = precondition(join_weight_bias(grads[2], grads[3]), basis, S, 1e-2)
        expected = join_weight_bias(reference.weight, reference.bias) - 0.1 * step
    torch.testing.assert_close(join_weight_bias(layer.weight, layer.bias), expected, **F64)


def test_frozen_weight_with_trainable_bias_is_refused():
    model = nn.Linear(3, 2)
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="freeze both or neither"):
        EKFAC(model, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr must be non-negative and finite"),
        ({"lr": float("inf")}, ValueError, "lr must be non-negative and finite"),
        ({"lr": float("nan")}, ValueError, "lr must be non-negative and finite"),
        ({"lr": "0.1"}, TypeError, "lr must be a non-negative number"),
        ({"lr": 0.1, "damping": 0.0}, ValueError, "damping must be positive"),
        ({"lr": 0.1, "damping": -1e-3}, ValueError, "damping must be positive"),
        ({"lr": 0.1, "update_freq": 0}, ValueError, "update_freq must be an integer >= 1"),
        ({"lr": 0.1, "update_freq": 2.5}, ValueError, "update_freq must be an integer >= 1"),
        ({"lr": 0.1, "update_freq": True}, ValueError, "update_freq must be an integer >= 1"),
        ({"lr": 0.1, "decay": 1.0}, ValueError, "decay must be a number in \\[0, 1\\)"),
        ({"lr": 0.1, "decay": -0.1}, ValueError, "decay must be a number in \\[0, 1\\)"),
        ({"lr": 0.1, "mode": "natural"}, ValueError, "mode must be 'ekfac' or 'kfac'"),
        ({"lr": 0.1, "loss_reduction": "none"}, ValueError, "loss_reduction must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        EKFAC(nn.Linear(3, 2), **kwargs)


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("lr", -0.1, ValueError, "lr must be non-negative"),
        ("lr", None, TypeError, "lr must be a non-negative number"),
        ("damping", 0.0, ValueError, "damping must be positive"),
        ("update_freq", 0, ValueError, "update_freq must be an integer >= 1"),
        ("decay", 1.5, ValueError, "decay must be a number in \\[0, 1\\)"),
    ],
)
def test_step_refuses_hyperparameters_changed_out_of_range(key, value, error, match):
    """A scheduler or a user writes param_groups directly: a negative lr would climb the loss
    without a word, update_freq = 0 crashed on a modulo, decay > 1 diverged."""
    model = nn.Linear(3, 2).double()
    optimizer = EKFAC(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 3, dtype=torch.float64)).square().mean().backward()
    optimizer.param_groups[0][key] = value
    with pytest.raises(error, match=match):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not optimizer.state


def test_not_a_model_is_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        EKFAC([nn.Parameter(torch.ones(2))], lr=0.1)


def test_step_reads_the_learning_rate_and_damping_of_its_param_group():
    # what an lr scheduler changes is param_groups[0]["lr"]; the step must use it
    case = OptimizerCase()
    model, batches = make_run(case)
    twin = copy.deepcopy(model)
    changed = EKFAC(model, lr=0.1, damping=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(changed, step_size=1, gamma=3.0)
    reference = EKFAC(twin, lr=0.1, damping=0.5)
    for index, (x, y) in enumerate(batches[:2]):
        for net, optimizer in ((model, changed), (twin, reference)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x)[0], y).backward()
            if net is twin and index == 1:
                optimizer.param_groups[0]["lr"] = 0.3
                optimizer.param_groups[0]["damping"] = 1e-2
            if net is model and index == 1:
                optimizer.param_groups[0]["damping"] = 1e-2
            optimizer.step()
        scheduler.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, **F64)
    assert changed.param_groups[0]["lr"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------
# Misuse that used to give a silently wrong (or no) step


def _train_once(net, optimizer, x, y):
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x)[0], y).backward()
    optimizer.step()


def test_a_grad_enabled_evaluation_between_backward_and_step_is_refused():
    # The evaluation forward starts a new batch (the recorder's backward_seen goes False): the
    # step used to find no layer reached and change nothing without a word.
    model, batches = make_run(OptimizerCase())
    optimizer = EKFAC(model, lr=0.2, damping=1e-2)
    (x, y), (x_eval, _) = batches[0], batches[1]
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x)[0], y).backward()
    model(x_eval)  # gradients enabled: recorded as a new batch without a backward
    with pytest.raises(RuntimeError, match=r"forward.*without a backward.*torch\.no_grad\(\)"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not optimizer.state


def test_a_forward_without_backward_is_refused_at_the_first_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    model(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="without a backward"):
        optimizer.step()


def test_no_grad_evaluation_between_backward_and_step_changes_nothing():
    # the same loop as the refused one, with the evaluation under no_grad: the same step as
    # without any evaluation, and the next step works too
    model, batches = make_run(OptimizerCase())
    twin = copy.deepcopy(model)
    optimizers = [EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin)]
    for x, y in batches[:3]:
        for net, optimizer in zip((model, twin), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x)[0], y).backward()
            if net is model:
                with torch.no_grad():
                    net(batches[4][0])
            optimizer.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)


def test_gradient_accumulation_over_micro_batches_is_refused():
    # Two forward+backward before one step: .grad is the sum over both, but the recorder holds
    # the second micro-batch only, so the curvature would be the last micro-batch's.
    model, batches = make_run(OptimizerCase())
    optimizer = EKFAC(model, lr=0.2, damping=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    for x, y in batches[:2]:
        nn.functional.cross_entropy(model(x)[0], y).backward()
    with pytest.raises(RuntimeError, match=r"2 batches.*per batch.*larger batch"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not optimizer.state


def test_accumulation_is_refused_also_after_earlier_steps_and_with_a_closure():
    model, batches = make_run(OptimizerCase())
    optimizer = EKFAC(model, lr=0.2, damping=1e-2)
    _train_once(model, optimizer, *batches[0])

    def closure():
        optimizer.zero_grad()
        for x, y in batches[1:3]:
            nn.functional.cross_entropy(model(x)[0], y).backward()

    with pytest.raises(RuntimeError, match="2 batches recorded since the last step"):
        optimizer.step(closure)


def test_ordinary_loops_and_closures_keep_stepping():
    # the counter compared at each step must not count the optimizer's own clear() or attach()
    model, batches = make_run(OptimizerCase())
    twin = copy.deepcopy(model)
    plain, with_closure = (EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin))
    for x, y in batches:
        _train_once(model, plain, x, y)

        def closure(x=x, y=y):
            with_closure.zero_grad()
            loss = nn.functional.cross_entropy(twin(x)[0], y)
            loss.backward()
            return loss

        with_closure.step(closure)
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)
    assert plain.state[model.layers[0].weight]["step"] == len(batches)


def test_clear_drops_a_batch_so_an_accumulated_one_can_be_replaced():
    model, batches = make_run(OptimizerCase())
    twin = copy.deepcopy(model)
    optimizer, reference = (EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin))
    (x0, y0), (x1, y1) = batches[0], batches[1]
    nn.functional.cross_entropy(model(x0)[0], y0).backward()  # not meant for a step
    optimizer.clear()
    optimizer.zero_grad()
    _train_once(model, optimizer, x1, y1)
    _train_once(twin, reference, x1, y1)
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="no batch recorded"):
        optimizer.step()


class Fragile(nn.Module):
    """Two Linear layers; the forward raises between them for a batch marked bad."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, bad=False):
        h = torch.tanh(self.first(x))
        if bad:
            raise ValueError("a corrupt batch")
        return self.second(h)


def test_clear_lets_training_continue_after_a_forward_raised_half_way():
    torch.manual_seed(0)
    model = Fragile().double()
    twin = copy.deepcopy(model)
    optimizer, reference = (EKFAC(net, lr=0.2, damping=1e-2) for net in (model, twin))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="corrupt"):
        model(torch.randn(5, 4, dtype=torch.float64), bad=True)
    # the recorder forgot the half-recorded batch of 5 (issue 14, item 11): no clear() needed
    for net, opt in ((model, optimizer), (twin, reference)):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)


def test_a_non_finite_batch_is_dropped_so_the_next_one_can_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    optimizer = EKFAC(model, lr=0.1)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    bad = x.clone()
    bad[0, 0] = float("nan")
    nn.functional.cross_entropy(model(bad), y).backward()
    with pytest.raises(FloatingPointError):
        optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # not refused as an accumulation of the bad batch and this one
    assert optimizer.state[model[0].weight]["step"] == 1


@pytest.mark.parametrize("lr", [0.1, -0.1])
def test_add_param_group_is_refused(lr):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = EKFAC(model, lr=0.1)
    extra = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="cannot take another parameter group"):
        optimizer.add_param_group({"params": [extra], "lr": lr})
    assert len(optimizer.param_groups) == 1


def test_a_warm_up_from_lr_zero_is_the_functional_step_at_each_lr():
    # LambdaLR(s / 100) sets lr = 0 before the first step: torch's optimizers take it, and so
    # must EKFAC; at lr = 0 the statistics are gathered and the parameters stay put.
    case = OptimizerCase()
    model, batches = make_run(case)
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    base_lr, damping = 0.5, 1e-2
    optimizer = EKFAC(model, base_lr, damping, case.update_freq, decay=case.decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: s / 100)
    state: dict = {}
    for step, (x, y) in enumerate(batches):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(base_lr * step / 100)
        _train_once(model, optimizer, x, y)
        functional_step(reference, state, x, y, case, step, base_lr * step / 100, damping)
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, **F64)
        if step == 0:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
        scheduler.step()
        with torch.no_grad():
            for got, want in zip(model.parameters(), reference.parameters()):
                want.copy_(got)


def test_lr_zero_is_accepted_at_construction_and_negative_still_refused():
    model = nn.Linear(3, 2).double()
    optimizer = EKFAC(model, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 3, dtype=torch.float64)).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="lr must be non-negative"):
        EKFAC(model, lr=-1e-9)


def _numpy_hyperparameters():
    np = pytest.importorskip("numpy")
    return {
        "lr": np.float32(0.3),
        "damping": np.float64(1e-2),
        "update_freq": np.int64(2),
        "decay": np.float32(0.9),
    }


def test_numpy_hyperparameters_are_python_numbers():
    hyper = _numpy_hyperparameters()
    case = OptimizerCase()
    model, batches = make_run(case)
    twin = copy.deepcopy(model)
    numpy_optimizer = EKFAC(model, **hyper)
    python_optimizer = EKFAC(twin, **{key: value.item() for key, value in hyper.items()})
    for x, y in batches:
        _train_once(model, numpy_optimizer, x, y)
        _train_once(twin, python_optimizer, x, y)
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got, want)
    # a scheduler may write a NumPy number into the group
    numpy_optimizer.param_groups[0]["lr"] = hyper["lr"]
    numpy_optimizer.param_groups[0]["update_freq"] = hyper["update_freq"]
    _train_once(model, numpy_optimizer, *batches[0])


def _trained(model, mode="ekfac", steps=3):
    torch.manual_seed(0)
    optimizer = EKFAC(model, lr=0.1, damping=1e-2, update_freq=2, mode=mode)
    for _ in range(steps):
        x = torch.randn(6, model[0].in_features, dtype=torch.float64)
        _train_once(lambda t: (model(t),), optimizer, x, torch.randint(0, 2, (6,)))
    return optimizer


def _net(widths=(3, 4, 2), bias=True, last_bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(widths[0], widths[1], bias=bias),
        nn.Tanh(),
        nn.Linear(widths[1], widths[2], bias=last_bias),
    ).double()


@pytest.mark.parametrize(
    ("saved_by", "loaded_into", "match"),
    [
        (
            lambda: _trained(_net(), mode="kfac"),
            lambda: EKFAC(_net(), lr=0.1),
            r"Linear '0'.*no 'scalings'.*saved by KFAC",
        ),
        (
            lambda: _trained(_net()),
            lambda: KFAC(_net(), lr=0.1),
            r"Linear '0'.*'scalings'.*saved by EKFAC",
        ),
        (
            lambda: _trained(_net((3, 5, 2))),
            lambda: EKFAC(_net((3, 4, 2)), lr=0.1),
            r"Linear '0'.*'G' has shape \(5, 5\) in the saved state.*needs \(4, 4\)",
        ),
        (
            lambda: _trained(_net((3, 4, 2), bias=False)),  # as many parameters: 3
            lambda: EKFAC(_net((3, 4, 2), last_bias=False), lr=0.1),
            r"Linear '0'.*'A' has shape \(3, 3\).*needs \(4, 4\)",
        ),
        (
            lambda: _trained(_net((3, 4, 2))),
            lambda: EKFAC(nn.Sequential(nn.Linear(3, 2)).double(), lr=0.1),
            r"4 parameters.*this EKFAC optimizes 2",
        ),
    ],
    ids=["kfac-into-ekfac", "ekfac-into-kfac", "other-width", "other-bias", "other-depth"],
)
def test_a_mismatched_state_is_refused_with_the_layer_and_what_differs(
    saved_by, loaded_into, match
):
    state = saved_by().state_dict()
    optimizer = loaded_into()
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(state)
    assert not optimizer.state


class TinyTransformerish(nn.Module):
    """Layers without Kronecker factors beside Linear ones: an Embedding, a LayerNorm, a bare
    parameter, and attention (whose out_proj belongs to the attention rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.scale = Scale()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        h = self.embed(tokens)  # (n, T, 4)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.scale.weight[:1] * self.norm(h)
        return self.head(torch.tanh(self.fc(h))).mean(1)


def test_parameters_without_kronecker_factors_take_a_plain_gradient_step():
    """Norm layers, embeddings, attention and bare parameters: theta -= lr * grad; the Linear
    layers are preconditioned (they move differently from plain SGD)."""
    torch.manual_seed(0)
    model = TinyTransformerish().double()
    tokens, y = torch.randint(0, 7, (5, 6)), torch.randn(5, 2, dtype=torch.float64)
    optimizer = EKFAC(model, lr=0.1, damping=1e-2)
    assert set(optimizer._layers) == {"fc", "head"}  # attn.out_proj is the attention rule's
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    nn.functional.mse_loss(model(tokens), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        plain = before[name] - 0.1 * grads[name]
        if name.startswith(("fc.", "head.")):
            assert not torch.allclose(p, plain), name
        else:
            torch.testing.assert_close(p, plain, rtol=1e-12, atol=1e-14, msg=name)


def _conv_net(kernel=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel), nn.Tanh(), nn.Flatten(), nn.Linear(2 * (6 - kernel) ** 2, 2)
    ).double()


def _trained_conv(model, mode="ekfac", steps=3):
    torch.manual_seed(0)
    optimizer = EKFAC(model, lr=0.1, damping=1e-2, update_freq=2, mode=mode)
    for _ in range(steps):
        x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
        _train_once(lambda t: (model(t),), optimizer, x, torch.randint(0, 2, (6,)))
    return optimizer


@pytest.mark.parametrize("mode", ["ekfac", "kfac"])
def test_a_conv_models_state_round_trip_continues_identically(mode):
    # the state check read in_features/out_features, which only nn.Linear has
    model = _conv_net()
    optimizer = _trained_conv(model, mode=mode)
    twin = copy.deepcopy(model)
    restored = EKFAC(twin, lr=0.1, damping=1e-2, update_freq=2, mode=mode)
    restored.load_state_dict(optimizer.state_dict())
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    for net, opt in [(model, optimizer), (twin, restored)]:
        for _ in range(3):
            _train_once(lambda t, net=net: (net(t),), opt, x, y)
    for got, want in zip(twin.parameters(), model.parameters()):
        assert torch.equal(got, want)


def test_a_conv_state_of_another_kernel_is_refused_with_the_layer_and_its_widths():
    state = _trained_conv(_conv_net(kernel=3)).state_dict()
    optimizer = EKFAC(_conv_net(kernel=2), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"Conv2d '0' \(in_channels=1, out_channels=2, kernel_size=\(2, 2\), with trainable "
        r"bias\): 'A' has shape \(10, 10\) in the saved state, but this layer needs \(5, 5\)",
    ):
        optimizer.load_state_dict(state)
    assert not optimizer.state
