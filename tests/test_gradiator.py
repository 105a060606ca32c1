"""Tests of the gradiator: black boxes checked against their torch twins and against formulas.

Every black box is written twice, in NumPy (what the gradiator wraps) and in torch (the twin that
autograd differentiates, the reference). Least-squares fits are checked against the exact
Jacobian of linear maps, against the expected error sqrt(1 - k/m) for k < m directions, the
truncation orders 1 and 2 in eps, and the noise formulas derived in the docstrings below.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import goodfellow
from goodfellow import (
    CallCounter,
    OnlineJacobian,
    estimate_jacobian,
    fit_jacobian,
    fitted_gradiator,
    gradiator,
    wrap_numpy,
)
from tests.conftest import TOLERANCES

F64 = torch.float64
TOL = TOLERANCES[F64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fits here are tiny (<= 24 x 12): a second thread only adds waiting, badly so when the
    cores are shared. Restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return ((estimate - reference).norm() / reference.norm()).item()


# ----------------------------------------------------------------------------------------------
# The case list: black boxes written in NumPy, with a torch twin and a hand-written NumPy VJP


@dataclass
class BlackBox:
    name: str
    m: int
    p: int
    numpy_fun: object  # ndarray (m,) or (n, m) -> (p,) or (n, p)
    numpy_vjp: object  # (x, grad_output) -> grad_input, NumPy
    torch_twin: object  # the same map in torch, for autograd

    def fun(self):
        return wrap_numpy(self.numpy_fun)

    def exact_grad_fun(self):
        def grad_fun(x, grad_output):
            result = self.numpy_vjp(x.detach().numpy(), grad_output.detach().numpy())
            return torch.tensor(result, dtype=x.dtype)

        return grad_fun


def make_linear(m=6, p=4, seed=0):
    rng = np.random.default_rng(seed)
    A, b = rng.standard_normal((p, m)), rng.standard_normal(p)
    At, bt = torch.tensor(A), torch.tensor(b)
    return BlackBox(
        "linear", m, p,
        lambda x: x @ A.T + b,
        lambda x, g: g @ A,
        lambda x: x @ At.T + bt,
    )  # fmt: skip


def make_tanh(m=5, p=3, seed=1):
    rng = np.random.default_rng(seed)
    A, b = rng.standard_normal((p, m)) / math.sqrt(m), rng.standard_normal(p)
    At, bt = torch.tensor(A), torch.tensor(b)
    return BlackBox(
        "tanh", m, p,
        lambda x: np.tanh(x @ A.T + b),
        lambda x, g: (g * (1 - np.tanh(x @ A.T + b) ** 2)) @ A,
        lambda x: torch.tanh(x @ At.T + bt),
    )  # fmt: skip


def make_sine_square(m=6, p=4, seed=2):
    """f(x) = sin(A x) + (B x)^2 / 2: smooth, with third derivatives of order one."""
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((p, m)), rng.standard_normal((p, m)) / 2
    At, Bt = torch.tensor(A), torch.tensor(B)
    return BlackBox(
        "sine_square", m, p,
        lambda x: np.sin(x @ A.T) + (x @ B.T) ** 2 / 2,
        lambda x, g: (g * np.cos(x @ A.T)) @ A + (g * (x @ B.T)) @ B,
        lambda x: torch.sin(x @ At.T) + (x @ Bt.T) ** 2 / 2,
    )  # fmt: skip


CASES = [make_linear(), make_tanh(), make_sine_square()]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def box(request):
    return request.param


def exact_jacobian(box: BlackBox, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(box.torch_twin, x)  # (p, m)


# ----------------------------------------------------------------------------------------------
# gradiator with an exact backward


@pytest.mark.parametrize("batch", [None, 7], ids=["single", "batch"])
def test_gradiator_matches_autograd_of_torch_twin(box, batch):
    shape = (box.m,) if batch is None else (batch, box.m)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    grad_output = torch.randn(shape[:-1] + (box.p,), dtype=F64)

    y = gradiator(box.fun(), box.exact_grad_fun())(x)
    y_twin = box.torch_twin(x_twin)
    (y * grad_output).sum().backward()
    (y_twin * grad_output).sum().backward()

    torch.testing.assert_close(y, y_twin, **TOL)
    torch.testing.assert_close(x.grad, x_twin.grad, **TOL)


@pytest.mark.parametrize("batch", [None, 3], ids=["single", "batch"])
def test_gradcheck_passes_with_exact_grad_fun(box, batch):
    shape = (box.m,) if batch is None else (batch, box.m)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(gradiator(box.fun(), box.exact_grad_fun()), (x,))


def test_gradcheck_fails_with_wrong_grad_fun(box):
    """The check above can fail: a backward off by a factor is caught."""
    grad_fun = box.exact_grad_fun()
    x = torch.randn(box.m, dtype=F64, requires_grad=True)
    wrong = gradiator(box.fun(), lambda x, g: 1.01 * grad_fun(x, g))
    assert not torch.autograd.gradcheck(wrong, (x,), raise_exception=False)


def test_gradiator_inside_a_network_matches_twin_network(box):
    """Parameters before and after the black box get autograd's gradients."""
    torch.manual_seed(3)
    first, last = torch.nn.Linear(3, box.m).double(), torch.nn.Linear(box.p, 2).double()
    inputs, targets = torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64)
    layer = gradiator(box.fun(), box.exact_grad_fun())

    grads = []
    for black_box in (layer, box.torch_twin):
        first.zero_grad(), last.zero_grad()
        loss = (last(black_box(torch.tanh(first(inputs)))) - targets).square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in (*first.parameters(), *last.parameters())])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, **TOL)


def test_grad_fun_not_called_when_x_needs_no_grad():
    box = make_linear()
    calls = []

    def grad_fun(x, g):
        calls.append(1)
        return g @ torch.tensor(np.zeros((box.p, box.m)))

    layer = gradiator(box.fun(), grad_fun)
    weight = torch.randn(box.p, dtype=F64, requires_grad=True)
    y = layer(torch.randn(box.m, dtype=F64))
    assert not y.requires_grad
    (y * weight).sum().backward()  # a graph through the black box's output, not its input
    assert calls == []
    torch.testing.assert_close(weight.grad, y)
    layer(torch.randn(box.m, dtype=F64, requires_grad=True)).sum().backward()
    assert calls == [1]


def test_gradiator_keeps_float32():
    box = make_tanh()
    x = torch.randn(4, box.m, requires_grad=True)
    y = gradiator(box.fun(), box.exact_grad_fun())(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == torch.float32
    x_twin = x.detach().double().requires_grad_()
    box.torch_twin(x_twin).sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad.float(), **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------------------------
# Least-squares fits: exactness for linear maps


@pytest.mark.parametrize("central", [True, False], ids=["central", "one_sided"])
@pytest.mark.parametrize("extra", [0, 1, 7], ids=lambda e: f"k=m+{e}")
def test_estimate_exact_for_linear_with_k_at_least_m(central, extra):
    box = make_linear(m=8, p=5)
    x = torch.randn(box.m, dtype=F64)
    J = estimate_jacobian(box.fun(), x, box.m + extra, central=central)
    assert J.shape == (box.p, box.m) and J.dtype == F64
    assert relative_error(J, exact_jacobian(box, x)) < 1e-10


@given(
    m=st.integers(1, 8),
    p=st.integers(1, 5),
    extra=st.integers(0, 9),
    log_eps=st.floats(-4, -1),
    central=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_estimate_exact_for_any_linear_map(m, p, extra, log_eps, central, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(p, m, dtype=F64, generator=generator)
    x = torch.randn(m, dtype=F64, generator=generator)
    J = estimate_jacobian(lambda v: v @ A.T, x, m + extra, 10**log_eps, central, generator)
    assert relative_error(J, A) < 1e-9


def test_fit_jacobian_exact_and_least_norm():
    m, p = 6, 3
    A = torch.randn(p, m, dtype=F64)
    dx = torch.randn(10, m, dtype=F64)
    torch.testing.assert_close(fit_jacobian(dx, dx @ A.T), A, **TOL)
    # k < m: the least-norm solution is A projected on the rows of dx.
    few = dx[:2]
    projector = few.T @ torch.linalg.solve(few @ few.T, few)  # (m, m), a reference formula
    torch.testing.assert_close(fit_jacobian(few, few @ A.T), A @ projector, **TOL)


def test_fit_jacobian_batched_equals_one_by_one():
    dx, df = torch.randn(4, 7, 3, dtype=F64), torch.randn(4, 7, 2, dtype=F64)
    batched = fit_jacobian(dx, df)
    assert batched.shape == (4, 2, 3)
    for i in range(4):
        torch.testing.assert_close(batched[i], fit_jacobian(dx[i], df[i]), **TOL)


def test_fit_jacobian_solves_least_squares_with_noise():
    """With more pairs than unknowns the residual is orthogonal to the columns of dx."""
    dx, df = torch.randn(20, 5, dtype=F64), torch.randn(20, 3, dtype=F64)
    J = fit_jacobian(dx, df)
    normal_residual = dx.T @ (dx @ J.T - df)  # (m, p)
    assert normal_residual.abs().max() < 1e-12


def test_fit_jacobian_accurate_where_normal_equations_are_not():
    """kappa(dx) = 1e6: the pseudo-inverse keeps ~1e-10, the normal equations (kappa^2) lose it."""
    m, p = 6, 2
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64))
    dx = U @ torch.diag(torch.logspace(0, -6, m, dtype=F64)) @ V.T  # (m, m)
    A = torch.randn(p, m, dtype=F64)
    df = dx @ A.T
    normal = (torch.linalg.inv(dx.T @ dx) @ dx.T @ df).T
    assert relative_error(fit_jacobian(dx, df), A) < 1e-8
    assert relative_error(normal, A) > 100 * relative_error(fit_jacobian(dx, df), A)


# ----------------------------------------------------------------------------------------------
# Fewer directions than inputs: error sqrt(1 - k/m)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_error_exactly_sqrt_one_minus_k_over_m_for_orthogonal_map(k):
    """For orthogonal J, ||J(I - P)||_F^2 = m - k whatever the directions: no randomness left."""
    m = 9
    Q, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64))
    J = estimate_jacobian(lambda v: v @ Q.T, torch.randn(m, dtype=F64), k)
    assert relative_error(J, Q) == pytest.approx(math.sqrt(1 - k / m), abs=1e-10)


@pytest.mark.parametrize("k", [1, 4, 8, 11])
def test_expected_error_for_fewer_directions_than_inputs(k):
    r"""E||J - \hat J||_F^2 / ||J||_F^2 = 1 - k/m, tested at 5 standard errors over 300 seeds."""
    m, p, seeds = 12, 5, 300
    A = torch.randn(p, m, dtype=F64) * torch.logspace(0, 1, m, dtype=F64)  # anisotropic
    x = torch.randn(m, dtype=F64)
    squared = torch.tensor(
        [
            relative_error(
                estimate_jacobian(
                    lambda v: v @ A.T, x, k, central=False,
                    generator=torch.Generator().manual_seed(seed),
                ),
                A,
            )
            ** 2
            for seed in range(seeds)
        ]
    )  # fmt: skip
    expected = 1 - k / m
    standard_error = squared.std().item() / math.sqrt(seeds)
    assert abs(squared.mean().item() - expected) < 5 * standard_error + 1e-12
    # The typical error itself is close to sqrt(1 - k/m) (it concentrates for p*m large).
    assert squared.mean().sqrt().item() == pytest.approx(math.sqrt(expected), abs=0.05)


# ----------------------------------------------------------------------------------------------
# Smooth maps: truncation order 1 (one-sided) and 2 (central), round-off for small eps


def fitted_slope(eps: np.ndarray, errors: np.ndarray) -> float:
    """Least-squares slope of log(error) against log(eps)."""
    design = np.stack([np.log(eps), np.ones_like(eps)], axis=1)
    (slope, _), *_ = np.linalg.lstsq(design, np.log(errors), rcond=None)
    return float(slope)


@pytest.mark.parametrize("central, order", [(False, 1), (True, 2)], ids=["one_sided", "central"])
def test_error_slope_against_eps(central, order):
    box = make_sine_square()
    x = torch.randn(box.m, dtype=F64)
    reference = exact_jacobian(box, x)
    eps = np.logspace(-3.5, -1.5, 9)
    errors = np.array(
        [
            relative_error(
                estimate_jacobian(
                    box.fun(), x, box.m, float(e), central, torch.Generator().manual_seed(0)
                ),
                reference,
            )
            for e in eps
        ]
    )
    assert fitted_slope(eps, errors) == pytest.approx(order, abs=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_off_grows_like_one_over_eps(dtype):
    """Far below the optimal eps, error ~ u |f| / eps: slope -1, and larger for float32."""
    box = make_sine_square()
    x = torch.randn(box.m, dtype=F64)
    reference = exact_jacobian(box, x)
    u = torch.finfo(dtype).eps
    eps = u * np.logspace(2, 4, 7)  # deep in the round-off regime for central differences
    errors = np.array(
        [
            relative_error(
                estimate_jacobian(
                    box.fun(), x.to(dtype), 4 * box.m, float(e), True,
                    torch.Generator().manual_seed(0),
                ).double(),
                reference,
            )
            for e in eps
        ]
    )  # fmt: skip
    assert fitted_slope(eps, errors) == pytest.approx(-1, abs=0.25)


@pytest.mark.parametrize(
    ("dtype", "central", "advised"),
    [(F64, False, 1e-8), (F64, True, 1e-5), (torch.float32, False, 3e-4),
     (torch.float32, True, 5e-3)],
    ids=["f64_one_sided", "f64_central", "f32_one_sided", "f32_central"],
)  # fmt: skip
def test_advised_eps_is_near_the_best(dtype, central, advised):
    """The eps the error message advises (sqrt(u) one-sided, u^(1/3) central) is within a
    small factor of the best error over a grid spanning eight decades."""
    box = make_sine_square()
    x = torch.randn(box.m, dtype=F64)
    reference = exact_jacobian(box, x)

    def error(eps):
        estimate = estimate_jacobian(
            box.fun(), x.to(dtype), box.m, eps, central, torch.Generator().manual_seed(0)
        )
        return relative_error(estimate.double(), reference)

    best = min(error(float(e)) for e in np.logspace(-10, -1, 19))
    assert error(advised) < 10 * best
    with pytest.raises(ValueError, match=f"{advised:.0e}".replace("-0", "-")):
        estimate_jacobian(box.fun(), x.to(dtype), box.m, 0.0)


def test_float32_round_off_dominates_where_float64_is_accurate():
    box = make_sine_square()
    x = torch.randn(box.m, dtype=F64)
    reference = exact_jacobian(box, x)
    errors = {
        dtype: relative_error(estimate_jacobian(box.fun(), x.to(dtype), box.m, 1e-5).double(),
                              reference)
        for dtype in (torch.float32, torch.float64)
    }  # fmt: skip
    assert errors[torch.float64] < 1e-8  # truncation ~eps^2, round-off ~1e-16 / eps
    assert errors[torch.float32] > 1e3 * errors[torch.float64]  # round-off ~1e-7 / eps


def test_float32_estimate_with_stated_tolerance():
    """Float32, eps = 1e-2, central: truncation ~1e-4 and round-off u/eps ~1e-5."""
    box = make_tanh()
    x = torch.randn(box.m)
    J = estimate_jacobian(box.fun(), x, box.m, eps=1e-2)
    assert J.dtype == torch.float32
    assert relative_error(J.double(), exact_jacobian(box, x.double())) < 1e-3


# ----------------------------------------------------------------------------------------------
# Noisy black boxes


def noisy_linear(A: torch.Tensor, sigma: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda v: v @ A.T + sigma * torch.randn(A.shape[0], dtype=F64, generator=generator)


@pytest.mark.parametrize("central", [True, False], ids=["central", "one_sided"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_noisy_linear_mean_squared_error_formula(central, blocks):
    r"""Output noise sigma per call, k = b m orthonormal directions of length eps:

    central: E||\hat J - J||_F^2 = m^2 p sigma^2 / (2 eps^2 k) (noise sigma^2/2 per pair);
    one-sided: twice m^2 p sigma^2 / (eps^2 k), half of it from the shared f(x).
    """
    m, p, sigma, eps, seeds = 6, 3, 1e-6, 1e-3, 250
    A = torch.randn(p, m, dtype=F64)
    x = torch.randn(m, dtype=F64)
    k = blocks * m
    squared = torch.tensor(
        [
            (
                estimate_jacobian(
                    noisy_linear(A, sigma, seed), x, k, eps, central,
                    torch.Generator().manual_seed(10_000 + seed),
                )
                - A
            ).square().sum().item()
            for seed in range(seeds)
        ]
    )  # fmt: skip
    expected = m**2 * p * sigma**2 / (eps**2 * k) * (0.5 if central else 2.0)
    standard_error = squared.std().item() / math.sqrt(seeds)
    assert abs(squared.mean().item() - expected) < 5 * standard_error


def test_more_samples_average_noise_away():
    A = torch.randn(3, 5, dtype=F64)
    x = torch.randn(5, dtype=F64)
    errors = [
        relative_error(estimate_jacobian(noisy_linear(A, 1e-5, 0), x, k, 1e-2), A) for k in (5, 500)
    ]
    assert errors[1] < errors[0] / 4  # 100x the samples: about 10x less error


# ----------------------------------------------------------------------------------------------
# fitted_gradiator: the VJP of a fitted Jacobian against autograd on the torch twin


@pytest.mark.parametrize("batch", [None, 4], ids=["single", "batch"])
def test_fitted_gradiator_vjp_matches_autograd(box, batch):
    shape = (box.m,) if batch is None else (batch, box.m)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    grad_output = torch.randn(shape[:-1] + (box.p,), dtype=F64)
    counter = CallCounter(box.fun())
    layer = fitted_gradiator(counter, eps=1e-4, generator=torch.Generator().manual_seed(0))

    (layer(x) * grad_output).sum().backward()
    (box.torch_twin(x_twin) * grad_output).sum().backward()

    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-6, atol=1e-8)  # O(eps^2) truncation
    n = 1 if batch is None else batch
    assert counter.num_points == n + n * 2 * box.m  # forward, then 2m points per example
    # A batch's perturbed points go to the black box in one call; a single x's one by one.
    assert counter.num_calls == (2 if batch else 1 + 2 * box.m)


def test_fitted_gradiator_one_sided_batch_matches_autograd():
    box = make_tanh()
    x = torch.randn(3, box.m, dtype=F64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    counter = CallCounter(box.fun())
    fitted_gradiator(counter, 2 * box.m, eps=1e-7, central=False)(x).sum().backward()
    box.torch_twin(x_twin).sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)  # O(eps) truncation
    assert counter.num_points == 3 + 3 * (2 * box.m + 1)


def test_fitted_gradiator_rejects_non_finite_perturbed_outputs():
    def log_of_first(v):  # finite at the inputs (all 1), nan a step to the left of 0
        return torch.log(v[..., :1] - 0.9999)

    layer = fitted_gradiator(log_of_first, eps=1e-3)
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.ones(2, 3, dtype=F64, requires_grad=True)).sum().backward()


def test_fitted_gradiator_gradcheck_on_linear_map():
    box = make_linear()
    x = torch.randn(2, box.m, dtype=F64, requires_grad=True)
    layer = fitted_gradiator(box.fun(), central=False)
    # Each backward draws new directions, so repeated backwards differ by round-off.
    assert torch.autograd.gradcheck(layer, (x,), nondet_tol=1e-10)


# ----------------------------------------------------------------------------------------------
# OnlineJacobian: recursive least squares


@given(
    m=st.integers(1, 6),
    p=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_online_equals_batch_least_squares(m, p, sizes, seed):
    """However the pairs are split into updates, the estimate is the fit of all of them."""
    generator = torch.Generator().manual_seed(seed)
    dx = torch.randn(sum(sizes), m, dtype=F64, generator=generator)
    df = torch.randn(sum(sizes), p, dtype=F64, generator=generator)
    online = OnlineJacobian(lambda v: v[..., :p], m, p)
    for chunk_x, chunk_f in zip(dx.split(sizes), df.split(sizes)):
        online.update(chunk_x, chunk_f)
    assert online.num_pairs == sum(sizes)
    torch.testing.assert_close(online.jacobian, fit_jacobian(dx, df), rtol=1e-9, atol=1e-10)


def test_online_forgetting_equals_weighted_least_squares():
    m, p, forgetting, sizes = 4, 2, 0.7, [3, 1, 4, 2]
    dx, df = torch.randn(sum(sizes), m, dtype=F64), torch.randn(sum(sizes), p, dtype=F64)
    online = OnlineJacobian(lambda v: v[..., :p], m, p, forgetting=forgetting)
    for chunk_x, chunk_f in zip(dx.split(sizes), df.split(sizes)):
        online.update(chunk_x, chunk_f)
    later_updates = torch.tensor(
        [len(sizes) - 1 - i for i, size in enumerate(sizes) for _ in range(size)], dtype=F64
    )  # (k,)
    root_weight = (forgetting**later_updates).sqrt().unsqueeze(1)  # (k, 1)
    reference = fit_jacobian(root_weight * dx, root_weight * df)
    torch.testing.assert_close(online.jacobian, reference, **TOL)


def test_online_broyden_contrast_exact_after_m_nonorthogonal_pairs():
    """Correlated directions: RLS is exact after m pairs, rank-one Broyden updates are not."""
    m, p = 5, 3
    A = torch.randn(p, m, dtype=F64)
    dx = torch.randn(m, m, dtype=F64) + 2  # strongly correlated rows
    online = OnlineJacobian(lambda v: v @ A.T, m, p)
    broyden = torch.zeros(p, m, dtype=F64)
    for row in dx:
        online.update(row[None], (row @ A.T)[None])
        broyden += torch.outer(row @ A.T - broyden @ row, row) / row.dot(row)
    assert relative_error(online.jacobian, A) < 1e-10
    assert relative_error(broyden, A) > 1e-3


@pytest.mark.parametrize("batch", [None, 6], ids=["single", "batch"])
def test_online_training_probes_make_linear_jacobian_exact(batch):
    box = make_linear(m=6, p=4)
    probes = 2
    online = OnlineJacobian(
        box.fun(), box.m, box.p, probes_per_call=probes, generator=torch.Generator().manual_seed(0)
    )
    shape = (box.m,) if batch is None else (batch, box.m)
    n = 1 if batch is None else batch
    for step in range(1, box.m // probes + 1):
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        online(x).sum().backward()
        assert online.num_points == step * (n + probes)
        assert online.num_pairs == step * probes
    x = torch.randn(box.m, dtype=F64)
    assert relative_error(online.jacobian, exact_jacobian(box, x)) < 1e-10

    x = torch.randn(shape, dtype=F64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    grad_output = torch.randn(shape[:-1] + (box.p,), dtype=F64)
    (online(x) * grad_output).sum().backward()
    (box.torch_twin(x_twin) * grad_output).sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(online, (x,))


def test_online_does_not_probe_without_backward():
    box = make_tanh()
    online = OnlineJacobian(box.fun(), box.m, box.p, probes_per_call=3)
    online(torch.randn(4, box.m, dtype=F64))  # x needs no grad
    with torch.no_grad():
        online(torch.randn(4, box.m, dtype=F64, requires_grad=True))
    assert online.num_points == 8 and online.num_pairs == 0
    assert torch.equal(online.jacobian, torch.zeros(box.p, box.m, dtype=F64))


def test_online_on_smooth_map_approaches_local_jacobian():
    """m probes at one point: the estimate is the one-sided estimate there, error O(eps)."""
    box = make_sine_square()
    x0 = torch.randn(box.m, dtype=F64)
    online = OnlineJacobian(box.fun(), box.m, box.p, probes_per_call=box.m, eps=1e-6)
    online(x0.clone().requires_grad_())
    assert relative_error(online.jacobian, exact_jacobian(box, x0)) < 1e-4  # O(eps) one-sided


# ----------------------------------------------------------------------------------------------
# NumPy wrapping and counting


def test_wrap_numpy_returns_new_tensor_in_input_dtype():
    identity = wrap_numpy(lambda a: a)
    x = torch.randn(3)
    y = identity(x)
    assert y.dtype == torch.float32 and torch.equal(x, y)
    y.add_(1)  # would change x if memory were shared
    assert not torch.equal(x, y)
    as_float64 = wrap_numpy(lambda a: np.asarray(a, dtype=np.float64) / 3)
    assert as_float64(torch.ones(2)).dtype == torch.float32
    assert wrap_numpy(lambda a: [1.0, 2.0])(torch.zeros(2, dtype=F64)).dtype == F64


def test_call_counter_counts_calls_and_points():
    counter = CallCounter(lambda v: v)
    counter(torch.zeros(3))
    counter(torch.zeros(5, 3))
    assert (counter.num_calls, counter.num_points) == (2, 6)


def test_public_names_exported():
    for name in ("gradiator", "estimate_jacobian", "fit_jacobian", "fitted_gradiator",
                 "OnlineJacobian", "wrap_numpy", "CallCounter"):  # fmt: skip
        assert name in goodfellow.__all__ and hasattr(goodfellow, name)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors


def linear_fun(v):
    return v @ torch.ones(3, 2, dtype=v.dtype)


def growing_output():
    sizes = iter(range(2, 100))
    return lambda v: torch.zeros(next(sizes), dtype=v.dtype)


@pytest.mark.parametrize(
    "fun, match",
    [
        (lambda v: v.sum(), "returned shape"),  # scalar
        (lambda v: torch.stack([v, v]), "returned shape"),  # 2-D for a single point
        (growing_output(), "output size must not depend on the input"),
        (lambda v: v / 0, "non-finite"),
        (lambda v: torch.full((2,), float("nan"), dtype=v.dtype), "non-finite"),
    ],
    ids=["scalar", "matrix", "changing", "inf", "nan"],
)
def test_estimate_rejects_bad_black_box_output(fun, match):
    with pytest.raises(ValueError, match=match):
        estimate_jacobian(fun, torch.randn(3, dtype=F64), 6)


def test_estimate_rejects_numpy_output_with_a_hint():
    with pytest.raises(TypeError, match="wrap_numpy"):
        estimate_jacobian(lambda v: v.numpy(), torch.randn(3, dtype=F64), 3)


@pytest.mark.parametrize("num_samples", [0, -2])
def test_estimate_rejects_too_few_samples(num_samples):
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        estimate_jacobian(linear_fun, torch.randn(3, dtype=F64), num_samples)


@pytest.mark.parametrize("num_samples", [2.0, True, "3"])
def test_estimate_rejects_non_integer_samples(num_samples):
    with pytest.raises(TypeError, match="num_samples must be an int"):
        estimate_jacobian(linear_fun, torch.randn(3, dtype=F64), num_samples)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf")])
def test_estimate_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite step length > 0"):
        estimate_jacobian(linear_fun, torch.randn(3, dtype=F64), 3, eps=eps)


def test_estimate_rejects_non_number_eps():
    with pytest.raises(TypeError, match="eps must be a real number"):
        estimate_jacobian(linear_fun, torch.randn(3, dtype=F64), 3, eps="1e-3")


@pytest.mark.parametrize("shape", [(), (2, 3), (1, 1, 3)], ids=["scalar", "batch", "3d"])
def test_estimate_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"single point of shape \(m,\)"):
        estimate_jacobian(linear_fun, torch.randn(shape, dtype=F64), 3)


def test_estimate_rejects_integer_or_non_finite_x():
    with pytest.raises(TypeError, match="floating-point"):
        estimate_jacobian(linear_fun, torch.arange(3), 3)
    with pytest.raises(TypeError, match="floating-point"):
        estimate_jacobian(linear_fun, [0.0, 1.0, 2.0], 3)
    with pytest.raises(ValueError, match="x holds non-finite"):
        estimate_jacobian(linear_fun, torch.tensor([0.0, float("nan"), 1.0]), 3)


@pytest.mark.parametrize("shape", [(), (2, 2, 3)], ids=["scalar", "3d"])
def test_gradiator_rejects_wrong_rank(shape):
    layer = gradiator(linear_fun, lambda x, g: g)
    with pytest.raises(ValueError, match=r"shape \(m,\) or a batch \(n, m\)"):
        layer(torch.randn(shape, dtype=F64))


def test_gradiator_rejects_bad_fun_outputs():
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for x of shape \(4, 3\)"):
        gradiator(lambda v: linear_fun(v)[:3], lambda x, g: g)(x)
    with pytest.raises(ValueError, match="returned shape"):
        gradiator(lambda v: linear_fun(v).flatten(), lambda x, g: g)(x)
    with pytest.raises(TypeError, match="wrap_numpy"):
        gradiator(lambda v: linear_fun(v).numpy(), lambda x, g: g)(x)
    with pytest.raises(TypeError, match="floating-point"):
        gradiator(lambda v: v.long(), lambda x, g: g)(x)


def test_gradiator_rejects_grad_fun_of_wrong_shape():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    layer = gradiator(linear_fun, lambda x, g: g)  # returns (4, 2), not (4, 3)
    with pytest.raises(ValueError, match=r"grad_fun returned shape \(4, 2\)"):
        layer(x).sum().backward()
    not_a_tensor = gradiator(linear_fun, lambda x, g: g.numpy())
    with pytest.raises(TypeError, match="grad_fun must return a torch.Tensor"):
        not_a_tensor(x.detach().requires_grad_()).sum().backward()


def test_constructors_reject_non_callables():
    with pytest.raises(TypeError, match="fun must be callable"):
        gradiator(3, lambda x, g: g)
    with pytest.raises(TypeError, match="grad_fun must be callable"):
        gradiator(linear_fun, None)
    with pytest.raises(TypeError, match="fun must be callable"):
        wrap_numpy("np.sin")
    with pytest.raises(TypeError, match="fun must be callable"):
        OnlineJacobian(None, 3, 2)


def test_fitted_gradiator_checks_arguments_early():
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        fitted_gradiator(linear_fun, 0)
    with pytest.raises(ValueError, match="eps must be a finite step length"):
        fitted_gradiator(linear_fun, eps=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        fitted_gradiator(linear_fun, generator=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_with_a_hint(dtype):
    """No half QR/SVD on CPU: the error came from deep inside torch.linalg."""
    match = "need float32 or float64"
    with pytest.raises(TypeError, match=f"x is {dtype}: .*{match}"):
        estimate_jacobian(lambda v: 2 * v, torch.ones(3, dtype=dtype), 3)
    with pytest.raises(TypeError, match=f"dx is {dtype}: .*{match}"):
        fit_jacobian(torch.eye(3, dtype=dtype), torch.eye(3, dtype=dtype))
    x = torch.ones(4, 3, dtype=dtype, requires_grad=True)
    with pytest.raises(TypeError, match=f"input x is {dtype}: .*{match}"):
        fitted_gradiator(lambda v: 2 * v)(x).sum().backward()
    online = OnlineJacobian(lambda v: 2 * v, 3, 3)
    with pytest.raises(TypeError, match=f"x is {dtype}: .*{match}"):
        online(x)
    assert online.num_calls == 0  # refused before the black box ran


def test_estimate_rejects_empty_point_and_bad_generator():
    with pytest.raises(ValueError, match=r"no entries \(shape \(0,\)\)"):
        estimate_jacobian(lambda v: torch.ones(2, dtype=F64), torch.ones(0, dtype=F64), 1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        estimate_jacobian(linear_fun, torch.ones(3, dtype=F64), 3, generator=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        OnlineJacobian(linear_fun, 3, 2, generator="cpu")


def test_an_empty_batch_has_an_empty_gradient():
    """The gradient w.r.t. no examples is empty; fitting or probing used to crash on it."""
    for layer in (fitted_gradiator(linear_fun), OnlineJacobian(linear_fun, 3, 2)):
        x = torch.zeros(0, 3, dtype=F64, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 2)
        y.sum().backward()
        assert x.grad.shape == (0, 3) and x.grad.dtype == F64
    assert layer.num_pairs == 0


def test_online_rejects_a_black_box_with_the_wrong_number_of_outputs():
    """The backward would fail on a (n, 1) @ (2, 3) product, far from the cause."""
    online = OnlineJacobian(lambda v: linear_fun(v)[..., :1], 3, 2, probes_per_call=0)
    with pytest.raises(ValueError, match="fun returned 1 outputs per point but .* out_features=2"):
        online(torch.zeros(5, 3, dtype=F64, requires_grad=True))


@pytest.mark.parametrize(
    "dx, df, error, match",
    [
        (torch.zeros(3, 2), torch.zeros(4, 2), ValueError, "one row per pair"),
        (torch.zeros(3), torch.zeros(3, 2), ValueError, "must be 2-D"),
        (torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64), ValueError, "convert one"),
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), TypeError, "floating-point"),
        (torch.full((3, 2), float("inf")), torch.zeros(3, 2), ValueError, "dx holds non-finite"),
    ],
    ids=["rows", "rank", "dtype", "integer", "inf"],
)
def test_fit_jacobian_rejects_bad_pairs(dx, df, error, match):
    with pytest.raises(error, match=match):
        fit_jacobian(dx, df)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"in_features": 0}, ValueError, "in_features must be at least 1"),
        ({"out_features": 2.0}, TypeError, "out_features must be an int"),
        ({"probes_per_call": -1}, ValueError, "probes_per_call must be at least 0"),
        ({"eps": 0.0}, ValueError, "eps must be a finite step length"),
        ({"forgetting": 0.0}, ValueError, r"forgetting must be a number in \(0, 1\]"),
        ({"forgetting": 1.5}, ValueError, r"forgetting must be a number in \(0, 1\]"),
    ],
)
def test_online_rejects_bad_settings(kwargs, error, match):
    settings = {"in_features": 3, "out_features": 2, **kwargs}
    with pytest.raises(error, match=match):
        OnlineJacobian(linear_fun, **settings)


def test_online_rejects_bad_pairs_and_inputs():
    online = OnlineJacobian(linear_fun, 3, 2)
    with pytest.raises(ValueError, match=r"dx must be \(k, 3\) and df \(k, 2\)"):
        online.update(torch.zeros(4, 2, dtype=F64), torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="df holds non-finite"):
        online.update(torch.zeros(1, 3, dtype=F64), torch.tensor([[0.0, float("nan")]], dtype=F64))
    assert online.num_pairs == 0  # a rejected update leaves the state alone
    with pytest.raises(ValueError, match="built for in_features=3"):
        online(torch.zeros(5, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"shape \(m,\) or a batch"):
        online(torch.zeros(2, 2, 3, dtype=F64))


def test_online_rejects_non_finite_probe_outputs():
    def blows_up_off_the_data(v):  # finite at the inputs, inf a step away
        return torch.where(v.abs().sum(-1, keepdim=True) > 0.5, float("inf"), 0.0).expand(-1, 2)

    online = OnlineJacobian(blows_up_off_the_data, 3, 2, probes_per_call=1, eps=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        online(torch.zeros(2, 3, dtype=F64, requires_grad=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gradiator_refuses_non_finite_output_of_fun(bad):
    def broken(v):
        out = v * 2.0
        out[..., 0] = bad
        return out

    wrapped = gradiator(broken, lambda v, g: 2.0 * g)
    for x in (torch.ones(3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="fun's output holds non-finite"):
            wrapped(x.requires_grad_())


# ----------------------------------------------------------------------------------------------
# wrap_numpy hands out a copy; fitted Jacobians refuse a second derivative; NumPy numbers


@pytest.mark.parametrize("batch", [False, True])
def test_wrap_numpy_black_box_working_in_place_leaves_the_caller_alone(batch):
    def centre(a):
        a -= a.mean()  # in place, as NumPy code often does
        return a

    x = torch.randn((4, 3) if batch else (3,), dtype=F64, requires_grad=True)
    before = x.detach().clone()
    y = wrap_numpy(centre)(x)
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(y, before - before.mean(), **TOL)
    view = torch.randn(6, dtype=F64)[::2]  # a strided input: the copy must not be a view either
    original = view.clone()
    wrap_numpy(centre)(view)
    assert torch.equal(view, original)


def _cube_problem(make):
    """d/dx and d²/dx² of fg(x**3).sum() + (x**2).sum() with fg = sin: 3x² cos(x³) + 2x, ..."""
    x = torch.tensor([0.3, -0.7, 1.1], dtype=F64, requires_grad=True)
    box = make(wrap_numpy(np.sin))
    loss = box(x**3).sum() + (x**2).sum()
    return x, loss


FITTED = {
    "fitted_gradiator": lambda fun: fitted_gradiator(fun, eps=1e-5),
    "OnlineJacobian": lambda fun: OnlineJacobian(fun, 3, 3, probes_per_call=0),
}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("route", ["autograd.grad", "backward"])
@pytest.mark.parametrize("name", FITTED)
def test_fitted_backwards_refuse_a_second_derivative(name, route):
    # d²/dx² of fg(x**3).sum() + (x**2).sum() came out 2 instead of 6x cos(x³) - 9x⁴ sin(x³) + 2
    x, loss = _cube_problem(FITTED[name])
    with pytest.raises(RuntimeError, match=rf"{name} has no second derivative.*create_graph"):
        if route == "backward":
            loss.backward(create_graph=True)
            x.grad.sum().backward()
        else:
            (first,) = torch.autograd.grad(loss, x, create_graph=True)
            torch.autograd.grad(first.sum(), x)


def test_fitted_gradiator_first_derivative_under_create_graph_is_still_right():
    x, loss = _cube_problem(FITTED["fitted_gradiator"])
    (first,) = torch.autograd.grad(loss, x, create_graph=True)
    u = x.detach() ** 3
    expected = 3 * x.detach() ** 2 * torch.cos(u) + 2 * x.detach()
    torch.testing.assert_close(first.detach(), expected, rtol=1e-8, atol=1e-9)


def test_an_exact_grad_fun_keeps_its_second_derivative():
    # gradiator with a grad_fun in torch operations is as differentiable as that grad_fun
    box = gradiator(torch.sin, lambda u, g: g * torch.cos(u))
    x = torch.tensor([0.3, -0.7, 1.1], dtype=F64, requires_grad=True)
    (first,) = torch.autograd.grad(box(x**3).sum() + (x**2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    u = x.detach() ** 3
    expected = 6 * x.detach() * torch.cos(u) - 9 * x.detach() ** 4 * torch.sin(u) + 2
    torch.testing.assert_close(second, expected, **TOL)


def test_numpy_numbers_configure_the_fits_like_python_numbers():
    A = torch.randn(2, 3, dtype=F64)
    x = torch.randn(3, dtype=F64)
    got = estimate_jacobian(
        lambda v: A @ v, x, np.int64(3), eps=np.float32(1e-3),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    want = estimate_jacobian(
        lambda v: A @ v, x, 3, eps=float(np.float32(1e-3)),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert torch.equal(got, want)
    fitted = fitted_gradiator(lambda v: v @ A.T, num_samples=np.int64(3), eps=np.float64(1e-4))
    xb = torch.randn(4, 3, dtype=F64, requires_grad=True)
    fitted(xb).sum().backward()
    torch.testing.assert_close(xb.grad, A.sum(0).expand(4, 3), **TOL)
    online = OnlineJacobian(
        lambda v: v @ A.T, np.int64(3), np.int64(2), probes_per_call=np.int64(3),
        eps=np.float32(1e-3), forgetting=np.float64(0.9),
    )  # fmt: skip
    online(torch.randn(5, 3, dtype=F64, requires_grad=True)).sum().backward()
    torch.testing.assert_close(online.jacobian, A, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: fitted_gradiator(np.sin, num_samples=np.float64(3.0)), TypeError, "num_samples"),
        (lambda: fitted_gradiator(np.sin, eps=np.bool_(True)), TypeError, "eps must be a real"),
        (lambda: OnlineJacobian(np.sin, 2, 2, forgetting=True), ValueError, "forgetting"),
        (lambda: OnlineJacobian(np.sin, np.float64(2.0), 2), TypeError, "in_features"),
    ],
    ids=["float-samples", "numpy-bool-eps", "bool-forgetting", "float-features"],
)
def test_numbers_that_are_not_numbers_are_still_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()
