r"""Statistics of per-example gradients, written once against the layer rules.

Every statistic here (norms, the mean, the clipped mean, the second moment, the variance and
its trace, the noise scale) takes a *source* of per-example gradients:

* materialized: a list or dict of ``(n, *param.shape)`` tensors (what
  :func:`goodfellow.goodfellow_backprop` and ``PerExampleGradients.grads`` return);
* factored: one layer's gradients as its rule keeps them (:class:`goodfellow.LinearFactors`
  for a linear layer), or a list or dict of them (:func:`mlp_factors`,
  :func:`recorded_factors`).

Both give the same numbers; the factored form never forms an ``(n, d_out, d_in)`` tensor where
its layer kind has a cheaper formula.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from goodfellow.backprop import check_layer_lists
from goodfellow.layers.linear import (
    LinearFactors,
    _layer_second_moment,
    _layer_sq_norms,
    _layer_weighted_sum,
    linear_factors,
    norm_from_squares,
)
from goodfellow.transforms import (
    PerExampleGrads,
    _check_max_norm,
    _clip_factors,
    _flatten,
    _pack,
    _unflatten,
    _unpack,
    expected_transform,
)

__all__ = [
    "clipped_mean",
    "gradient_mean",
    "gradient_noise_scale",
    "gradient_norms",
    "gradient_second_moment",
    "gradient_variance",
    "gradient_variance_trace",
    "mlp_factors",
    "noise_scale_parts",
    "recorded_factors",
]


def mlp_factors(
    activations: Sequence[Tensor], linear_grads: Sequence[Tensor], loss_reduction: str = "sum"
) -> list[LinearFactors]:
    """The factored per-example gradients of a :class:`goodfellow.MLP`, one entry per layer.

    Statistics computed from the result come out as lists ``[W_1, b_1, ..., W_L, b_L]``, the
    layout of :func:`goodfellow.goodfellow_backprop` and of ``model.parameters()``.

    Args:
        activations: Inputs of the linear layers, ``activations[l]`` of shape ``(n, d_l)``.
        linear_grads: ``torch.autograd.grad(loss, linear_combs)``, ``linear_grads[l]`` of shape
            ``(n, d_{l+1})`` (with ``create_graph=True`` to differentiate the statistics).
        loss_reduction: ``"sum"`` or ``"mean"``, as for :func:`goodfellow.goodfellow_backprop`.

    Returns:
        One :class:`goodfellow.LinearFactors` per layer, each with ``T = 1`` position.

    Raises:
        TypeError: If the arguments are not lists of tensors.
        ValueError: If the lists do not describe one batch through one chain of layers (see
            :func:`goodfellow.goodfellow_backprop`).
    """
    # the same checks as goodfellow_backprop: one chain of (n, features) layers, one batch
    check_layer_lists(activations, linear_grads)
    factors = [
        linear_factors(a, g, True, loss_reduction) for a, g in zip(activations, linear_grads)
    ]
    _check_factors(factors)
    return factors


def recorded_factors(recorder: object) -> dict[str, LinearFactors]:
    """The factored per-example gradients of every ``nn.Linear`` a recorder saw in its batch.

    Reads ``recorder.layers`` of a :class:`goodfellow.PerExampleGradients` after the batch's
    ``loss.backward()``: each layer's inputs and per-example output gradients (all calls of the
    layer). Statistics computed from the result are dicts keyed like
    ``model.named_parameters()`` (``"fc1.weight"``, ``"fc1.bias"``, ...), ready for
    :func:`goodfellow.assign_grads`::

        with PerExampleGradients(model, loss_reduction="mean") as pe:
            F.cross_entropy(model(x), y).backward()
        assign_grads(model, clipped_mean(recorded_factors(pe), max_norm=1.0))

    Args:
        recorder: A :class:`goodfellow.PerExampleGradients` that recorded a forward and a
            backward.

    Returns:
        Module name to :class:`goodfellow.LinearFactors`, for every Linear with a trainable weight,
        in the
        order of ``model.named_modules()``. A frozen bias is left out of the layer's results.

    Raises:
        TypeError: If ``recorder`` has no ``layers`` dict of records.
        ValueError: If a layer's weight is frozen while its bias is trained, or a weight is
            shared by several Linear modules (use ``recorder.grads`` for those).
        RuntimeError: If no forward and backward were recorded for the batch.
    """
    layers = getattr(recorder, "layers", None)
    if not isinstance(layers, Mapping):
        raise TypeError(
            "recorder must be a goodfellow.PerExampleGradients that recorded a batch, got "
            f"{type(recorder).__name__}."
        )
    factors: dict[str, LinearFactors] = {}
    owner_of_weight: dict[int, str] = {}
    for name, record in layers.items():
        module = record.module
        has_bias = module.bias is not None and module.bias.requires_grad
        if not module.weight.requires_grad:
            if has_bias:
                raise ValueError(
                    f"Linear {name!r} has a frozen weight but a trainable bias, which the "
                    "factored form does not cover; use recorder.grads."
                )
            continue
        if id(module.weight) in owner_of_weight:
            raise ValueError(
                f"Linear {name!r} shares its weight with {owner_of_weight[id(module.weight)]!r}; "
                "the factored form keeps one layer per weight: use recorder.grads."
            )
        owner_of_weight[id(module.weight)] = name
        if record.inputs:
            inputs = list(record.inputs)
            grad_outputs = record.per_example_grad_outputs  # raises if no backward was recorded
        else:  # not called in this batch: a zero gradient
            n = getattr(recorder, "batch_size", None)
            if n is None:
                raise RuntimeError(
                    "the recorder holds no batch: run the forward and loss.backward() inside "
                    "`with PerExampleGradients(model) as pe:` first."
                )
            like = module.weight
            inputs = [torch.zeros(n, 1, module.in_features, dtype=like.dtype, device=like.device)]
            grad_outputs = [inputs[0].new_zeros(n, 1, module.out_features)]
        factors[name] = linear_factors(inputs, grad_outputs, has_bias, "sum")
    if not factors:
        raise ValueError("the recorder holds no Linear layer with a trainable weight.")
    return factors




def _is_factored(source: object) -> bool:
    if isinstance(source, LinearFactors):
        return True
    values = list(source.values()) if isinstance(source, Mapping) else source
    if isinstance(values, (list, tuple)) and values:
        kinds = {isinstance(v, LinearFactors) for v in values}
        if kinds == {True, False}:
            raise TypeError(
                "mix of LinearFactors and other entries: pass either per-example gradients "
                "or the factored form of every layer."
            )
        return kinds == {True}
    return False


def _factor_layers(source: object) -> tuple[list[str] | None, list[LinearFactors]]:
    if isinstance(source, LinearFactors):
        return None, [source]
    if isinstance(source, Mapping):
        return list(source.keys()), list(source.values())
    return None, list(source)  # type: ignore[arg-type]


def _check_factors(layers: Sequence[LinearFactors]) -> int:
    for k, layer in enumerate(layers):
        for name, t in (("inputs", layer.inputs), ("grad_outputs", layer.grad_outputs)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(
                    f"layer {k}: LinearFactors.{name} must be a floating-point torch.Tensor, "
                    f"got {kind}; build the factors with linear_factors."
                )
    first = layers[0].inputs
    n = first.shape[0]
    for k, layer in enumerate(layers):
        A, G, _ = layer
        if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
            raise ValueError(
                f"layer {k}: LinearFactors need inputs (n, T, d_in) and grad_outputs "
                f"(n, T, d_out), got {tuple(A.shape)} and {tuple(G.shape)}; build them with "
                "linear_factors."
            )
        if A.shape[0] != n:
            raise ValueError(
                f"layer {k} holds {A.shape[0]} examples but layer 0 holds {n}: all layers must "
                "come from one batch."
            )
        if (
            A.dtype != first.dtype
            or G.dtype != first.dtype
            or A.device != first.device
            or G.device != first.device
        ):
            raise ValueError(f"layer {k} differs in dtype or device from layer 0.")
    if n == 0:
        raise ValueError("the batch is empty (n = 0): an average over examples needs an example.")
    return n


def _pack_factored(
    source: object, keys: list[str] | None, per_layer: list[list[Tensor]]
) -> PerExampleGrads:
    """Lay per-layer results out as ``[W, b, ...]``, or ``{name.weight, name.bias}`` for dicts."""
    if keys is None:
        return [t for layer in per_layer for t in layer]
    out: dict[str, Tensor] = {}
    for key, layer in zip(keys, per_layer):
        for suffix, t in zip(("weight", "bias"), layer):
            out[f"{key}.{suffix}" if key else suffix] = t  # "" is the root module
    return out


# --------------------------------------------------------------------------------------------
# Statistics, on either form
# --------------------------------------------------------------------------------------------


def _sq_norms(source: object) -> Tensor:
    if _is_factored(source):
        _, layers = _factor_layers(source)
        _check_factors(layers)
        return sum(_layer_sq_norms(layer) for layer in layers)  # type: ignore[return-value]
    _, tensors, n = _unpack(source)  # type: ignore[arg-type]
    return _flatten(tensors, n).square().sum(dim=1)  # (n,)


def gradient_norms(source: PerExampleGrads | LinearFactors | Sequence[LinearFactors]) -> Tensor:
    r"""The L2 norm of each example's whole gradient, :math:`\|g_i\|_2` over all parameters.

    In factored form each layer contributes :math:`\sum_{t,s}(G_t\cdot G_s)(A_t\cdot A_s)`
    (:math:`\|G\|^2\|A\|^2` for plain vectors) plus :math:`\|\sum_t G_t\|^2` for its bias;
    nothing of size ``n * d_out * d_in`` is formed when the Gram matrices are smaller.

    Args:
        source: Per-example gradients (list, tuple or dict of ``(n, *param.shape)`` tensors),
            or their factored form: a :class:`goodfellow.LinearFactors`, a list of them (e.g. from
            :func:`mlp_factors`) or a dict of them.

    Returns:
        Tensor of shape ``(n,)``; differentiable if the source is (derivative 0 at a zero
        gradient, as for ``torch.linalg.vector_norm``).
    """
    return norm_from_squares(_sq_norms(source))  # (n,)


def _weighted_sum(source: object, weights: Tensor) -> PerExampleGrads:
    r""":math:`\sum_i w_i g_i` in the source's layout, one contraction per tensor."""
    if _is_factored(source):
        keys, layers = _factor_layers(source)
        _check_factors(layers)
        per_layer = [_layer_weighted_sum(layer, weights) for layer in layers]
        return _pack_factored(source, keys, per_layer)
    keys, tensors, n = _unpack(source)  # type: ignore[arg-type]
    # einsum("n,n...->...") as a matrix-vector product on the flattened rows
    summed = [(weights @ g.reshape(n, -1)).reshape(g.shape[1:]) for g in tensors]
    return _pack(source, keys, summed)


def _batch_size(source: object) -> int:
    if _is_factored(source):
        return _check_factors(_factor_layers(source)[1])
    return _unpack(source)[2]  # type: ignore[arg-type]


def _uniform_weights(source: object, n: int) -> Tensor:
    """``(n,)`` weights ``1/n`` in the source's dtype and device."""
    if _is_factored(source):
        like = _factor_layers(source)[1][0].inputs
    else:
        like = _unpack(source)[1][0]  # type: ignore[arg-type]
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def gradient_mean(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
) -> PerExampleGrads:
    r"""The batch gradient :math:`\bar g = \frac1n\sum_i g_i` (of the per-example losses' mean).

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.

    Returns:
        One tensor of shape ``param.shape`` per parameter: the source's container for
        per-example gradients; ``[W, b, ...]`` for a list of factors; ``{"name.weight",
        "name.bias"}`` for a dict of factors keyed by module name.
    """
    n = _batch_size(source)
    return _weighted_sum(source, _uniform_weights(source, n))


def clipped_mean(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], max_norm: float
) -> PerExampleGrads:
    r"""The DP-SGD clipped mean :math:`\frac1n\sum_i g_i\min(1, C/\|g_i\|)`, by reweighting.

    Clipping multiplies each example's gradient by a scalar, so the clipped mean is the
    weighted sum :math:`\sum_i w_i g_i` with :math:`w_i = \min(1, C/\|g_i\|)/n`. In factored
    form that is one contraction per layer, ``einsum("n,nto,nti->oi", w, G, A)``: the rows of
    :math:`G` are rescaled before the usual batch-gradient product, and no per-example tensor
    is formed (the norms come from :func:`gradient_norms`). Abadi et al. 2016,
    arXiv:1607.00133; the noise DP-SGD adds afterwards is not part of this function.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        max_norm: The clipping norm :math:`C > 0`.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``max_norm`` is not a positive finite number, or an example's gradient
            holds NaN or inf.
    """
    max_norm = _check_max_norm(max_norm)
    n = _batch_size(source)
    # gradient_norms has derivative 0 at a zero gradient, so the clamp's 0 stays 0 (no NaN)
    norms = gradient_norms(source)  # (n,)
    _check_finite_norms(norms)
    weights = _clip_factors(norms, max_norm) / n  # (n,)
    return _weighted_sum(source, weights)


def _check_finite_norms(norms: Tensor) -> None:
    """Refuse non-finite per-example gradients, which would make the weighted sum NaN.

    An infinite norm gets the weight ``C / inf = 0``, and ``0 * inf`` is NaN: the clipped mean
    would be NaN with no hint of which example diverged.
    """
    if norms.device.type == "meta":  # a shape-only run (device="meta") has no values to check
        return
    finite = torch.isfinite(norms)  # (n,)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"the per-example gradients of {len(bad)} example(s) (rows {shown}) hold NaN or "
            "inf, so no clipped mean exists: the loss diverged or the inputs hold NaN/inf "
            "(lower the learning rate or check the data)."
        )


def gradient_second_moment(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
) -> PerExampleGrads:
    r"""The entrywise second moment :math:`\frac1n\sum_i g_i \odot g_i`.

    In factored form, for plain vector inputs, :math:`\frac1n (G^{\circ 2})^\top A^{\circ 2}`
    per layer (squares taken entrywise: the trick of Balles, Romero & Hennig's reference code);
    layers with several positions form their per-example gradients.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.
    """
    if _is_factored(source):
        keys, layers = _factor_layers(source)
        _check_factors(layers)
        return _pack_factored(source, keys, [_layer_second_moment(layer) for layer in layers])
    return expected_transform(source, torch.square)  # type: ignore[arg-type]


def _correction(n: int, unbiased: bool) -> float:
    """``n / (n - 1)`` for the unbiased estimator, else ``1``."""
    if not unbiased:
        return 1.0
    if n < 2:
        raise ValueError(
            "the unbiased (n - 1) variance needs at least 2 examples in the batch, got 1; "
            "use unbiased=False or a larger batch."
        )
    return n / (n - 1)


def gradient_variance(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = False
) -> PerExampleGrads:
    r"""The entrywise variance of the per-example gradients: the diagonal of their covariance.

    .. math::

        \operatorname{Var}[g] = \frac1{n - c} \sum_i (g_i - \bar g)^2, \qquad c = 0
        \text{ (default) or } 1 \text{ (unbiased)}.

    With ``c = 0`` it is the variance of the batch's empirical distribution; ``c = 1`` gives the
    unbiased estimate of the variance of a single example's gradient over the data distribution.
    Per-example gradients are centered first (two passes, no cancellation); the factored form
    uses :math:`\frac{n}{n-c}(\overline{g^2} - \bar g^2)`, which loses relative accuracy where
    the variance is tiny compared with :math:`\bar g^2`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Divide by ``n - 1`` instead of ``n``.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    if _is_factored(source):
        n = _batch_size(source)
        correction = _correction(n, unbiased)
        moment, mean = gradient_second_moment(source), gradient_mean(source)
        if isinstance(moment, dict):
            return {key: (moment[key] - mean[key].square()) * correction for key in moment}
        return [(m - g.square()) * correction for m, g in zip(moment, mean)]
    keys, tensors, n = _unpack(source)  # type: ignore[arg-type]
    correction = _correction(n, unbiased)
    flat = _flatten(tensors, n)  # (n, P)
    centered = flat - flat.mean(dim=0)  # (n, P)
    variance = centered.square().mean(dim=0) * correction  # (P,)
    return _pack(source, keys, _unflatten(variance, tensors))


def _trace_and_mean(source: object, unbiased: bool) -> tuple[Tensor, PerExampleGrads]:
    r"""The trace of the covariance and the mean gradient, from the same pass."""
    n = _batch_size(source)
    correction = _correction(n, unbiased)
    mean = gradient_mean(source)
    values = mean.values() if isinstance(mean, dict) else mean
    if _is_factored(source):
        # tr Cov = mean_i ||g_i||^2 - ||g_bar||^2 (factored: the g_i are never formed)
        mean_sq_norm = _sq_norms(source).mean()
        trace = mean_sq_norm - sum(g.square().sum() for g in values)
    else:
        tensors = _unpack(source)[1]  # type: ignore[arg-type]
        flat = _flatten(tensors, n)  # (n, P)
        centered = flat - _flatten([g.unsqueeze(0) for g in values], 1)  # (n, P)
        trace = centered.square().sum() / n
    return trace * correction, mean


def gradient_variance_trace(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = False
) -> Tensor:
    r"""The trace of the per-example gradients' covariance, :math:`\operatorname{tr}\Sigma`.

    .. math::

        \operatorname{tr}\Sigma = \frac1{n - c}\sum_i \|g_i - \bar g\|^2
        = \frac{n}{n - c}\Big(\frac1n\sum_i\|g_i\|^2 - \|\bar g\|^2\Big),

    the second form used for the factored source (norms from :func:`gradient_norms`, no
    per-example tensor). ``c = 0`` matches CABS's reference code; ``c = 1`` is unbiased. The
    variance of the batch gradient :math:`\bar g` itself is :math:`\operatorname{tr}\Sigma / n`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Divide by ``n - 1`` instead of ``n``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    return _trace_and_mean(source, unbiased)[0]


def noise_scale_parts(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    r"""Estimates of :math:`\operatorname{tr}\Sigma` and :math:`|G|^2` from one batch.

    :math:`G` is the expected gradient. Since
    :math:`\mathbb{E}\|\bar g\|^2 = |G|^2 + \operatorname{tr}\Sigma / n`, the unbiased
    estimates are :math:`S = \operatorname{tr}\hat\Sigma` (with ``n - 1``) and
    :math:`|G|^2 \approx \|\bar g\|^2 - S / n` (McCandlish et al. 2018, arXiv:1812.06162,
    appendix A, with batch sizes ``1`` and ``n``). Average each over steps before dividing:
    the ratio of two noisy estimates is biased, and the second one can be negative when the
    noise dominates. ``unbiased=False`` returns the plug-in values
    :math:`\operatorname{tr}\hat\Sigma` (with ``n``) and :math:`\|\bar g\|^2`.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Return the unbiased estimates (needs ``n >= 2``).

    Returns:
        ``(trace, squared_norm)``, two scalar tensors.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    trace, mean = _trace_and_mean(source, unbiased)
    values = mean.values() if isinstance(mean, dict) else mean
    squared_norm = sum(g.square().sum() for g in values)
    if unbiased:
        squared_norm = squared_norm - trace / _batch_size(source)
    return trace, squared_norm  # type: ignore[return-value]


def gradient_noise_scale(
    source: PerExampleGrads | LinearFactors | Sequence[LinearFactors], unbiased: bool = True
) -> Tensor:
    r"""The simple gradient noise scale, :math:`\mathcal{B} = \operatorname{tr}\Sigma / |G|^2`.

    McCandlish et al. 2018 (arXiv:1812.06162) show it predicts the critical batch size: batches
    much smaller than :math:`\mathcal{B}` waste steps, much larger ones waste examples. One
    batch's estimate is noisy; see :func:`noise_scale_parts` for the parts to average.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Use the unbiased estimates of both parts (see :func:`noise_scale_parts`).

    Returns:
        A scalar tensor (negative or infinite when the noise swamps the unbiased estimate of
        :math:`|G|^2`).

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example, or every per-example
            gradient is zero (the ratio is then 0/0).
    """
    trace, squared_norm = noise_scale_parts(source, unbiased)
    # Both parts vanish only when every g_i is 0; the ratio would be a silent NaN.
    if bool(trace == 0) and bool(squared_norm == 0):
        raise ValueError(
            "every per-example gradient is zero, so the noise scale tr(Sigma) / |G|^2 is 0/0; "
            "the batch carries no gradient (check that the loss depends on the parameters)."
        )
    return trace / squared_norm
