r"""Statistics of per-example gradients, written once against the layer rules.

Every statistic here (norms, the mean, the clipped mean, the second moment, the variance and
its trace, the noise scale) takes a *source* of per-example gradients:

* materialized: a list or dict of ``(n, *param.shape)`` tensors (what
  :func:`goodfellow.goodfellow_backprop` and ``PerExampleGradients.grads`` return);
* factored: one layer's gradients as its rule keeps them (:class:`goodfellow.LinearFactors`
  for a linear layer), or a list or dict of them (:func:`goodfellow.mlp_factors`,
  :func:`goodfellow.recorded_factors`).

Both give the same numbers; the factored form never forms an ``(n, d_out, d_in)`` tensor where
its layer kind has a cheaper formula.
"""

from __future__ import annotations

from torch import Tensor

from goodfellow._autocast import without_autocast
from goodfellow._ranks import _all_reduce, _global_count, _sums
from goodfellow._statistics_checks import check_finite_norms, refuse_empty
from goodfellow.layers.base import norm_from_squares
from goodfellow.layers.formed_clipping import norms_and_formed_sums
from goodfellow.layers.shared_inputs import summed_sq_norms
from goodfellow.sources import (  # noqa: F401  (recorded_factors: a statistic's source)
    Source,
    _batch_size,
    _example_tensor,
    _layers,
    recorded_factors,
)
from goodfellow.transforms import PerExampleGrads, _check_max_norm, _clip_factors

__all__ = [
    "clipped_mean",
    "gradient_mean",
    "gradient_noise_scale",
    "gradient_norms",
    "gradient_second_moment",
    "gradient_variance",
    "gradient_variance_trace",
    "noise_scale_parts",
]


# --------------------------------------------------------------------------------------------
# The statistics
# --------------------------------------------------------------------------------------------


@without_autocast
def gradient_norms(source: Source) -> Tensor:
    r"""The L2 norm of each example's whole gradient, :math:`\|g_i\|_2` over all parameters.

    In factored form each layer contributes :math:`\sum_{t,s}(G_t\cdot G_s)(A_t\cdot A_s)`
    (:math:`\|G\|^2\|A\|^2` for plain vectors) plus :math:`\|\sum_t G_t\|^2` for its bias;
    nothing of size ``n * d_out * d_in`` is formed when the Gram matrices are smaller.

    Args:
        source: Per-example gradients (list, tuple or dict of ``(n, *param.shape)`` tensors),
            or their factored form: a :class:`goodfellow.LinearFactors`, a list of them (e.g. from
            :func:`goodfellow.mlp_factors`) or a dict of them.

    Returns:
        Tensor of shape ``(n,)``; differentiable if the source is (derivative 0 at a zero
        gradient, as for ``torch.linalg.vector_norm``).
    """
    _, layers, _ = _layers(source)
    return norm_from_squares(summed_sq_norms(layers))  # (n,)


@without_autocast
def gradient_mean(source: Source, *, group: object = None) -> PerExampleGrads:
    r"""The batch gradient :math:`\bar g = \frac1n\sum_i g_i` (of the per-example losses' mean).

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        One tensor of shape ``param.shape`` per parameter: the source's container for
        per-example gradients; ``[W, b, ...]`` for a list of factors; ``{"name.weight",
        "name.bias"}`` for a dict of factors keyed by module name.
    """
    layout, layers, _ = _layers(source, allow_empty=group is not None)
    sums, total, _ = _sums(layers, None, group)
    refuse_empty(total)
    return layout.pack([[t / total for t in layer] for layer in sums])


def _clipped_sum(source: Source, max_norm: float, group: object = None) -> PerExampleGrads:
    r""":math:`\sum_i \operatorname{clip}_C(g_i)` in the source's layout.

    Summed over the ranks of ``group``; an empty batch gives zeros (Poisson sampling draws
    such batches).
    """
    return _clipped_sum_and_count(source, max_norm, group)[0]


def _clipped_sum_and_count(source: Source, max_norm: float, group: object = None) -> tuple:
    """The clipped sum and the number of examples over all ranks."""
    max_norm = _check_max_norm(max_norm)
    layout, layers, _ = _layers(source, allow_empty=True)
    # gradient norms have derivative 0 at a zero gradient, so the clamp's 0 stays 0 (no NaN)
    norms, formed = norms_and_formed_sums(layers, max_norm, _clip_factors)  # (n,)
    check_finite_norms(norms)
    sums, total, _ = _sums(layers, _clip_factors(norms, max_norm), group, done=formed)
    return layout.pack(sums), total


@without_autocast
def clipped_mean(source: Source, max_norm: float, *, group: object = None) -> PerExampleGrads:
    r"""The DP-SGD clipped mean :math:`\frac1n\sum_i g_i\min(1, C/\|g_i\|)`, by reweighting.

    Clipping multiplies each example's gradient by a scalar, so the clipped mean is the
    weighted sum :math:`\sum_i w_i g_i` with :math:`w_i = \min(1, C/\|g_i\|)/n`. In factored
    form that is one contraction per layer, ``einsum("n,nto,nti->oi", w, G, A)``: the rows of
    :math:`G` are rescaled before the usual batch-gradient product, and no ``n * P`` tensor
    is formed (the norms come from :func:`gradient_norms`, layer by layer). Where a layer's
    norms are cheaper from its formed per-example gradients than from the Gram form, the
    weighted sum reuses them instead of a second product: linear layers at several positions
    are formed a chunk of examples at a time, all together, and each chunk's clipped sum taken
    before the next (:mod:`goodfellow.layers.formed_clipping`); a convolution keeps its formed
    gradients, ``n`` times its parameters, for its weighted sum. Abadi et al. 2016,
    arXiv:1607.00133; the noise DP-SGD adds afterwards is not part of this function.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        max_norm: The clipping norm :math:`C > 0`.
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``max_norm`` is not a positive finite number, or an example's gradient
            holds NaN or inf.
    """
    clipped, total = _clipped_sum_and_count(source, max_norm, group)
    refuse_empty(total)
    if isinstance(clipped, dict):
        return {key: t / total for key, t in clipped.items()}
    return type(clipped)(t / total for t in clipped)


@without_autocast
def gradient_second_moment(source: Source, *, group: object = None) -> PerExampleGrads:
    r"""The entrywise second moment :math:`\frac1n\sum_i g_i \odot g_i`.

    In factored form, for plain vector inputs, :math:`\frac1n (G^{\circ 2})^\top A^{\circ 2}`
    per layer (squares taken entrywise: the trick of Balles, Romero & Hennig's reference code);
    layers with several positions form their per-example gradients.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.
    """
    layout, layers, _ = _layers(source, allow_empty=group is not None)
    squares = [layer.square_sum() for layer in layers]
    flat = _all_reduce([t for layer in squares for t in layer], group)
    total = _global_count(layers, group)
    refuse_empty(total)
    it = iter(flat)
    return layout.pack([[next(it) / total for _ in layer] for layer in squares])


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


def _mean_and_total(layers: list, group: object) -> tuple[list[list[Tensor]], int]:
    sums, total, _ = _sums(layers, None, group)
    refuse_empty(total)
    return [[t / total for t in layer] for layer in sums], total


@without_autocast
def gradient_variance(
    source: Source, unbiased: bool = False, *, group: object = None
) -> PerExampleGrads:
    r"""The entrywise variance of the per-example gradients: the diagonal of their covariance.

    .. math::

        \operatorname{Var}[g] = \frac1{n - c} \sum_i (g_i - \bar g)^2, \qquad c = 0
        \text{ (default) or } 1 \text{ (unbiased)}.

    With ``c = 0`` it is the variance of the batch's empirical distribution; ``c = 1`` gives the
    unbiased estimate of the variance of a single example's gradient over the data distribution.
    Per-example gradients are centered first (two passes, no cancellation); the factored form
    uses :math:`\frac{n}{n-c}(\overline{g^2} - \bar g^2)`, which loses relative accuracy where
    the variance is tiny compared with :math:`\bar g^2`; its round-off negatives are set to 0,
    the nearest variance.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Divide by ``n - 1`` instead of ``n``.
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        One tensor of shape ``param.shape`` per parameter, laid out as in
        :func:`gradient_mean`.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    layout, layers, _ = _layers(source, allow_empty=group is not None)
    mean, total = _mean_and_total(layers, group)
    correction = _correction(total, unbiased)
    per_layer = []
    for layer, m in zip(layers, mean):
        if hasattr(layer, "centered_square_sum"):
            per_layer.append(layer.centered_square_sum(m))  # two passes, exact
        else:  # sum g^2 - n m^2: the factored form, summed over ranks below
            per_layer.append(layer.square_sum())
    flat = _all_reduce([t for layer in per_layer for t in layer], group)
    it = iter(flat)
    variance = []
    for layer, m in zip(layers, mean):
        exact = hasattr(layer, "centered_square_sum")
        results = []
        for mk in m:
            s = next(it)
            v = s / total if exact else s / total - mk.square()
            results.append((v * correction).clamp(min=0))
        variance.append(results)
    return layout.pack(variance)


def _trace_and_mean(source: Source, unbiased: bool) -> tuple[Tensor, PerExampleGrads]:
    """The trace of the covariance and the mean gradient (one process)."""
    return _trace_mean_total(source, unbiased)[:2]


def _trace_mean_total(
    source: Source, unbiased: bool, group: object = None
) -> tuple[Tensor, PerExampleGrads, int]:
    r"""The trace of the covariance, the mean gradient and the global ``n``, from one pass.

    Materialized: :math:`\frac1n\sum_i\|g_i - \bar g\|^2` (two passes); factored:
    :math:`\frac1n\sum_i\|g_i\|^2 - \|\bar g\|^2` (the :math:`g_i` are never formed).
    """
    layout, layers, _ = _layers(source, allow_empty=group is not None)
    exact = all(hasattr(layer, "centered_sq_norm_sum") for layer in layers)
    if exact:
        mean, total = _mean_and_total(layers, group)
        parts = [layer.centered_sq_norm_sum(m) for layer, m in zip(layers, mean)]
        (centered,) = _all_reduce([sum(parts)], group)
        trace = centered / total
    else:
        sq = summed_sq_norms(layers).sum()
        sums, total, (sq,) = _sums(layers, None, group, sq)
        refuse_empty(total)
        mean = [[t / total for t in layer] for layer in sums]
        trace = sq / total - sum(t.square().sum() for layer in mean for t in layer)
    trace = (trace * _correction(total, unbiased)).clamp(min=0)
    return trace, layout.pack(mean), total


@without_autocast
def gradient_variance_trace(
    source: Source, unbiased: bool = False, *, group: object = None
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
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    return _trace_mean_total(source, unbiased, group)[0]


@without_autocast
def noise_scale_parts(
    source: Source, unbiased: bool = True, *, group: object = None
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
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        ``(trace, squared_norm)``, two scalar tensors.

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example.
    """
    trace, mean, total = _trace_mean_total(source, unbiased, group)
    values = mean.values() if isinstance(mean, dict) else mean
    squared_norm = sum(g.square().sum() for g in values)
    if unbiased:
        squared_norm = squared_norm - trace / total
    return trace, squared_norm  # type: ignore[return-value]


@without_autocast
def gradient_noise_scale(source: Source, unbiased: bool = True, *, group: object = None) -> Tensor:
    r"""The simple gradient noise scale, :math:`\mathcal{B} = \operatorname{tr}\Sigma / |G|^2`.

    McCandlish et al. 2018 (arXiv:1812.06162) show it predicts the critical batch size: batches
    much smaller than :math:`\mathcal{B}` waste steps, much larger ones waste examples. One
    batch's estimate is noisy; see :func:`noise_scale_parts` for the parts to average.

    Args:
        source: Per-example gradients or their factored form, as for :func:`gradient_norms`.
        unbiased: Use the unbiased estimates of both parts (see :func:`noise_scale_parts`).
        group: A ``torch.distributed`` process group: every rank passes the source of its own
            examples and gets the statistic of all ranks' examples together (one all-reduce
            of ``O(P)`` numbers; see :doc:`/scaling_out`). ``None``: this process only.

    Returns:
        A scalar tensor (negative or infinite when the noise swamps the unbiased estimate of
        :math:`|G|^2`).

    Raises:
        ValueError: If ``unbiased`` and the batch holds a single example, or every per-example
            gradient is zero (the ratio is then 0/0).
    """
    trace, squared_norm = noise_scale_parts(source, unbiased, group=group)
    # Both parts vanish only when every g_i is 0; the ratio would be a silent NaN.
    if bool(trace == 0) and bool(squared_norm == 0):
        raise ValueError(
            "every per-example gradient is zero, so the noise scale tr(Sigma) / |G|^2 is 0/0; "
            "the batch carries no gradient (check that the loss depends on the parameters)."
        )
    return trace / squared_norm
