"""The exercise checks: a right answer is reported right, a wrong one wrong, a missing one as
not answered yet. The right answers here are written independently of goodfellow.exercises (naive
loops, autograd, formulas), the wrong ones are the mistakes students make."""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import goodfellow
from goodfellow import exercises as ex

F = nn.functional


def parameter_count(widths):
    return sum(o * (i + 1) for i, o in zip(widths[:-1], widths[1:]))


def mean_linear_grads(model, x, targets):
    y, _, linear_combs = model(x)
    return list(torch.autograd.grad(F.cross_entropy(y, targets), linear_combs))


def sum_linear_grads(model, x, targets):
    y, _, linear_combs = model(x)
    return list(torch.autograd.grad(F.cross_entropy(y, targets, reduction="sum"), linear_combs))


def backward_loop(model, x, targets, zero=True, clone=True):
    rows = []
    for i in range(len(x)):
        if zero:
            # keeping the .grad tensors (set_to_none=False) is where a missing clone() bites
            model.zero_grad(set_to_none=clone)
        F.cross_entropy(model(x[i : i + 1])[0], targets[i : i + 1], reduction="sum").backward()
        rows.append([p.grad.clone() if clone else p.grad for p in model.parameters()])
    model.zero_grad()
    return [torch.stack(column) for column in zip(*rows)]


def losses_and_norms(model, x, targets):
    losses, norms = [], []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1])[0], targets[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        losses.append(loss.detach())
        norms.append(torch.cat([g.flatten() for g in grads]).norm())
    return torch.stack(losses), torch.stack(norms)


def seq_grads(G, A):
    return torch.einsum("nto,nti->noi", G, A), G.sum(1)


def seq_norms(G, A):
    gram_G = torch.einsum("nto,nso->nts", G, G)
    gram_A = torch.einsum("nti,nsi->nts", A, A)
    return (gram_G * gram_A).sum((1, 2)).sqrt()


def clipped_sum(activations, linear_grads, max_norm):
    sq = sum(G.square().sum(1) * (A.square().sum(1) + 1) for A, G in zip(activations, linear_grads))
    c = (max_norm / sq.sqrt()).clamp(max=1.0)
    out = []
    for A, G in zip(activations, linear_grads):
        out += [(c[:, None] * G).T @ A, (c[:, None] * G).sum(0)]
    return out


def to_linear_grads(model, x, labels):
    y, activations, linear_combs = model(x)
    return activations, torch.autograd.grad(F.cross_entropy(y, labels), linear_combs)


def outer_products(activations, linear_grads):
    n = len(activations[0])
    out = []
    for A, G in zip(activations, linear_grads):
        out += [n * G[:, :, None] * A[:, None, :], n * G]
    return out


def workspace_loop(pe, workspace):
    if workspace is None:
        workspace = {k: torch.empty_like(v) for k, v in pe.compute_grads().items()}
    return pe.compute_grads(out=workspace), workspace


def fresh_loop(pe, workspace):
    return pe.compute_grads(), None


def fisher_of_one(a_bar, delta):
    g = torch.outer(delta[0], a_bar[0]).flatten()
    return torch.outer(g, g)


def factored_step(g_hat, A, G, damping):
    gamma = damping**0.5
    left = torch.linalg.solve(G + gamma * torch.eye(len(G), dtype=G.dtype), g_hat)
    return left @ torch.linalg.inv(A + gamma * torch.eye(len(A), dtype=A.dtype))


def second_moment(A, G):
    return torch.einsum("nto,nti->noi", G, A).square().mean(0)


def best_step(c, u, f_norm, q):
    return (u * f_norm / (q * c)) ** (1 / (q + 1))


def broyden(J, dx, df):
    return J + torch.outer(df - J @ dx, dx) / dx.dot(dx)


def conv1d_per_example(conv, x, grad_output):
    # patches by hand: circular padding, then every output position's dilated window
    pad = conv.padding[0]
    padded = torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1)  # (n, C_in, L_in + 2 pad)
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    L = grad_output.shape[-1]
    n = len(x)
    grads = torch.zeros(n, *conv.weight.shape, dtype=x.dtype)
    for i in range(n):
        for t in range(L):
            window = padded[i, :, t * s : t * s + d * (k - 1) + 1 : d]  # (C_in, k)
            grads[i] += grad_output[i, :, t, None, None] * window[None]
    return grads


def embedding_sq_norms(tokens, G, padding_idx):
    n, T, d = G.shape
    norms = []
    for i in range(n):
        rows = torch.zeros(int(tokens.max()) + 1, d, dtype=G.dtype)
        for t in range(T):
            if padding_idx is None or tokens[i, t] != padding_idx:
                rows[tokens[i, t]] += G[i, t]
        norms.append(rows.square().sum())
    return torch.stack(norms)


def layernorm_grads(ln, x, G, eps=None):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + (ln.eps if eps is None else eps))
    return (G * x_hat).sum(1), G.sum(1)


def removal_shifts(grads, max_norm):
    norms = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
    return norms.clamp(max=max_norm)


def update_noise(sample_rate):
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=sample_rate,
        steps=round(15 / sample_rate),
        accountant="rdp",
    )
    return sigma / (sample_rate * 1440)


def two_epsilons(sigma, sample_rate, steps):
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history = [(sigma, sample_rate, steps)]
    prv.history = [(sigma, sample_rate, steps)]
    return rdp.get_epsilon(1e-5), prv.get_epsilon(1e-5)


RIGHT_AND_WRONG = {
    "parameter_count": (
        lambda: ex.check_parameter_count(parameter_count),
        lambda: ex.check_parameter_count(lambda w: sum(o * i for i, o in zip(w[:-1], w[1:]))),
    ),
    "mean_linear_grads": (
        lambda: ex.check_mean_linear_grads(mean_linear_grads),
        lambda: ex.check_mean_linear_grads(sum_linear_grads),
    ),
    "batchnorm_rows": (
        lambda: ex.check_batchnorm_rows(list(range(8))),
        lambda: ex.check_batchnorm_rows([2]),
    ),
    "single_layer_shapes": (
        lambda: ex.check_single_layer_shapes(
            {"activations": [(32, 10)], "linear_combs": [(32, 1)], "weight": (1, 10), "bias": (1,)}
        ),
        lambda: ex.check_single_layer_shapes(
            {"activations": [(32, 10)], "linear_combs": [(32, 1)], "weight": (10, 1), "bias": (1,)}
        ),
    ),
    "epoch_estimate": (
        lambda: ex.check_epoch_estimate(
            lambda ns, nn_, ps, pn, size: (size * ns / nn_, size / pn * ps)
        ),
        lambda: ex.check_epoch_estimate(lambda ns, nn_, ps, pn, size: (size * ns, size / pn * ps)),
    ),
    "backward_loop": (
        lambda: ex.check_backward_loop(backward_loop),
        lambda: ex.check_backward_loop(lambda m, x, t: backward_loop(m, x, t, zero=False)),
    ),
    "backward_loop_no_clone": (
        lambda: ex.check_backward_loop(backward_loop),
        lambda: ex.check_backward_loop(lambda m, x, t: backward_loop(m, x, t, clone=False)),
    ),
    "mse_example_loss": (
        lambda: ex.check_mse_example_loss(lambda p, t: (p - t).square().mean()),
        lambda: ex.check_mse_example_loss(lambda p, t: (p - t).square().sum()),
    ),
    "losses_and_norms": (
        lambda: ex.check_losses_and_norms(losses_and_norms),
        lambda: ex.check_losses_and_norms(lambda m, x, t: losses_and_norms(m, x, t)[::-1]),
    ),
    "in_out_layout": (
        lambda: ex.check_in_out_layout(lambda a, g: torch.einsum("ni,no->nio", a, g)),
        lambda: ex.check_in_out_layout(lambda a, g: torch.einsum("ni,no->noi", a, g)),
    ),
    "sequence_grads": (
        lambda: ex.check_sequence_grads(seq_grads),
        lambda: ex.check_sequence_grads(lambda G, A: (seq_grads(G, A)[0], G.mean(1))),
    ),
    "sequence_norms": (
        lambda: ex.check_sequence_norms(seq_norms),
        lambda: ex.check_sequence_norms(lambda G, A: G.norm(dim=(1, 2)) * A.norm(dim=(1, 2))),
    ),
    "clipped_sum": (
        lambda: ex.check_clipped_sum(clipped_sum),
        lambda: ex.check_clipped_sum(lambda a, g, c: [x / len(a[0]) for x in clipped_sum(a, g, c)]),
    ),
    "validation_errors": (
        lambda: ex.check_validation_errors({"goodfellow": 3e-16, "torch.func": 0.0}),
        lambda: ex.check_validation_errors({"goodfellow": 3e-7, "torch.func": 0.0}),
    ),
    "time_split": (
        lambda: ex.check_time_split(to_linear_grads, outer_products),
        lambda: ex.check_time_split(
            to_linear_grads, lambda a, g: [x / len(a[0]) for x in outer_products(a, g)]
        ),
    ),
    "mse_delta": (
        lambda: ex.check_mse_delta(lambda y_hat, y: 2 / 3 * (y_hat - y)),
        lambda: ex.check_mse_delta(lambda y_hat, y: 2 / 30 * (y_hat - y)),
    ),
    "sequence_reduction": (
        lambda: ex.check_sequence_reduction("mean"),
        lambda: ex.check_sequence_reduction("sum"),
    ),
    "first_term_grad": (
        lambda: ex.check_first_term_grad(
            lambda m, x: torch.autograd.grad(m(x)[0].square().sum(), m[0].weight)[0]
        ),
        lambda: ex.check_first_term_grad(
            lambda m, x: torch.autograd.grad(m(x[:2])[0].square().sum(), m[0].weight)[0]
        ),
    ),
    "workspace": (
        lambda: ex.check_workspace(workspace_loop),
        lambda: ex.check_workspace(fresh_loop),
    ),
    "one_example_fisher": (
        lambda: ex.check_one_example_fisher(fisher_of_one),
        lambda: ex.check_one_example_fisher(lambda a, d: torch.kron(a.T @ a, d.T @ d)),
    ),
    "factored_damping": (
        lambda: ex.check_factored_damping(factored_step),
        lambda: ex.check_factored_damping(lambda g, A, G, lam: factored_step(g, A, G, lam**2)),
    ),
    "best_diagonal": (
        lambda: ex.check_best_diagonal(lambda F_, Q: torch.diagonal(Q.T @ F_ @ Q)),
        lambda: ex.check_best_diagonal(lambda F_, Q: torch.diagonal(F_)),
    ),
    "sum_learning_rate": (
        lambda: ex.check_sum_learning_rate(0.03 / 64),
        lambda: ex.check_sum_learning_rate(0.03),
    ),
    "linear_transform": (
        lambda: ex.check_linear_transform(
            lambda grads, M: M @ torch.cat([g.mean(0).flatten() for g in grads])
        ),
        lambda: ex.check_linear_transform(
            lambda grads, M: M.T @ torch.cat([g.mean(0).flatten() for g in grads])
        ),
    ),
    "cabs_first_batch": (
        lambda: ex.check_cabs_first_batch(1, 2),
        lambda: ex.check_cabs_first_batch(2, 2),
    ),
    "cabs_learning_rate_factor": (
        lambda: ex.check_cabs_learning_rate_factor(2),
        lambda: ex.check_cabs_learning_rate_factor(4),
    ),
    "second_moment": (
        lambda: ex.check_second_moment(second_moment),
        lambda: ex.check_second_moment(
            lambda A, G: torch.einsum("nto,nti->oi", G**2, A**2) / len(A)
        ),
    ),
    "best_step": (
        lambda: ex.check_best_step(best_step),
        lambda: ex.check_best_step(lambda c, u, f, q: math.sqrt(u)),
    ),
    "broyden_update": (
        lambda: ex.check_broyden_update(broyden),
        lambda: ex.check_broyden_update(lambda J, dx, df: J + torch.outer(df, dx)),
    ),
    "conv_per_example": (
        lambda: ex.check_conv_per_example(conv1d_per_example),
        lambda: ex.check_conv_per_example(
            lambda conv, x, g: conv1d_per_example(conv, x, g).transpose(2, 3)
        ),
    ),
    "depthwise_fraction": (
        lambda: ex.check_depthwise_fraction(1 / 32),
        lambda: ex.check_depthwise_fraction(1 / 9),
    ),
    "gram_limit": (
        lambda: ex.check_gram_limit(128),
        lambda: ex.check_gram_limit(256),
    ),
    "embedding_sq_norms": (
        lambda: ex.check_embedding_sq_norms(embedding_sq_norms),
        lambda: ex.check_embedding_sq_norms(lambda t, G, p: embedding_sq_norms(t, G, None)),
    ),
    "layernorm_grads": (
        lambda: ex.check_layernorm_grads(layernorm_grads),
        lambda: ex.check_layernorm_grads(lambda ln, x, G: layernorm_grads(ln, x, G, eps=1e-5)),
    ),
    "largest_gram_length": (
        lambda: ex.check_largest_gram_length(lambda d_in, d_out: d_in * d_out // (d_in + d_out)),
        lambda: ex.check_largest_gram_length(lambda d_in, d_out: min(d_in, d_out) // 2),
    ),
    "removal_shifts": (
        lambda: ex.check_removal_shifts(removal_shifts),
        lambda: ex.check_removal_shifts(lambda grads, c: removal_shifts(grads, 1e9)),
    ),
    "update_noise": (
        lambda: ex.check_update_noise(update_noise),
        lambda: ex.check_update_noise(lambda q: update_noise(q) * q * 1440),
    ),
    "two_epsilons": (
        lambda: ex.check_two_epsilons(two_epsilons),
        lambda: ex.check_two_epsilons(lambda s, q, k: two_epsilons(s, q, k)[::-1]),
    ),
    "noise_prediction": (
        lambda: ex.check_noise_prediction(lambda m, p, s, e, k: m**2 * p * s**2 / (2 * e**2 * k)),
        lambda: ex.check_noise_prediction(lambda m, p, s, e, k: m * p * s**2 / (2 * e**2 * k)),
    ),
}


@pytest.mark.parametrize("name", sorted(RIGHT_AND_WRONG))
def test_a_right_answer_is_reported_right(name, capsys):
    right, _ = RIGHT_AND_WRONG[name]
    assert right() is True
    assert ": right." in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(RIGHT_AND_WRONG))
def test_a_wrong_answer_is_reported_wrong(name, capsys):
    _, wrong = RIGHT_AND_WRONG[name]
    assert wrong() is False
    assert "not right yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "call",
    [
        lambda: ex.check_parameter_count(lambda widths: None),
        lambda: ex.check_mean_linear_grads(None),
        lambda: ex.check_batchnorm_rows(...),
        lambda: ex.check_sum_learning_rate(None),
    ],
)
def test_an_unanswered_exercise_says_so(call, capsys):
    assert call() is False
    assert "not answered yet" in capsys.readouterr().out


def test_a_function_that_raises_is_reported_with_its_error(capsys):
    def broken(widths):
        raise KeyError("oops")

    assert ex.check_parameter_count(broken) is False
    assert "KeyError" in capsys.readouterr().out


def test_the_reproduced_bugs_check():
    torch.manual_seed(0)
    model = goodfellow.MLP(4, [5, 5], output_size=3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.randint(0, 3, (6,))
    truth = goodfellow.naive_per_example_grads(model, nn.CrossEntropyLoss(), x, t)
    transposed = list(truth)
    transposed[2] = truth[2].transpose(1, 2)
    assert ex.check_reproduced_bugs([g / 6 for g in truth], transposed, truth, 6)
    assert not ex.check_reproduced_bugs(list(truth), transposed, truth, 6)
    assert not ex.check_reproduced_bugs([g / 6 for g in truth], list(truth), truth, 6)


def test_exercises_is_not_in_the_public_api():
    assert "exercises" not in goodfellow.__all__
    checks = {name for name in dir(ex) if name.startswith("check_")}
    assert len(checks) >= 37
    assert not checks & set(goodfellow.__all__)


def test_the_package_re_exports_each_check_of_its_modules_once():
    """``from goodfellow.exercises import check_x`` finds every check, whichever module holds it."""
    defined = {}
    for module_info in pkgutil.iter_modules(ex.__path__):
        module = importlib.import_module(f"{ex.__name__}.{module_info.name}")
        for name, value in vars(module).items():
            if name.startswith("check_") and value.__module__ == module.__name__:
                assert name not in defined, f"{name} defined in {defined.get(name)} and {module}"
                defined[name] = module.__name__
                assert getattr(ex, name) is value, f"goodfellow.exercises.{name} is not {module}'s"
    assert set(ex.__all__) == set(defined), set(ex.__all__) ^ set(defined)


TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.ipynb"))
IMPORTED_CHECK = re.compile(r"from goodfellow\.exercises import (check_\w+)")


@pytest.mark.parametrize("notebook", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_each_tutorial_finds_its_checks_in_a_module_that_names_it(notebook):
    imported = IMPORTED_CHECK.findall(notebook.read_text())
    assert imported, f"{notebook.name} imports no check"
    for name in imported:
        assert name in ex.__all__, f"{notebook.name} imports {name}, which the package lacks"
        module = importlib.import_module(getattr(ex, name).__module__)
        assert notebook.stem in module.__doc__, f"{module.__name__} does not name {notebook.stem}"


def test_every_check_is_used_by_a_tutorial():
    used = set()
    for notebook in TUTORIALS:
        used |= set(IMPORTED_CHECK.findall(notebook.read_text()))
    assert set(ex.__all__) <= used, f"no tutorial runs {sorted(set(ex.__all__) - used)}"


def test_an_answer_of_the_wrong_kind_is_reported_not_raised(capsys):
    shapes = {"activations": None, "linear_combs": 3, "weight": (1, 10), "bias": (1,)}
    assert ex.check_single_layer_shapes(shapes) is False
    assert "not right yet" in capsys.readouterr().out
