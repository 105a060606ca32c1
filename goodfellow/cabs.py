r"""CABS: SGD with coupled adaptive batch sizes (its batches come from goodfellow.sampler)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from goodfellow._autocast import without_autocast
from goodfellow._checks import is_integer, is_real, real_number
from goodfellow._ranks import _all_reduce
from goodfellow.layers.linear import LinearFactors
from goodfellow.sources import _layers
from goodfellow.statistics import _trace_mean_total
from goodfellow.transforms import PerExampleGrads, assign_grads

__all__ = ["CABS"]


# --------------------------------------------------------------------------------------------
# CABS: SGD with coupled adaptive batch sizes
# --------------------------------------------------------------------------------------------


def _check_bounds(bounds: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds must be a pair (min_batch_size, max_batch_size), got {bounds!r}.")
    low, high = bounds
    for value in (low, high):
        if not is_integer(value):
            raise TypeError(f"bounds must hold two integers, got {bounds!r}.")
    low, high = int(low), int(high)
    if low < 1:
        raise ValueError(f"the smallest batch size must be at least 1, got bounds {bounds!r}.")
    if low > high:
        raise ValueError(
            f"bounds are out of order: min_batch_size {low} > max_batch_size {high}; pass "
            "(min, max)."
        )
    return low, high


def _check_lr(lr: float) -> float:
    lr = real_number(lr, "lr", "a non-negative number")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(
            f"lr must be a non-negative finite number, got {lr} (0 is allowed, as where a "
            "warm-up schedule starts)."
        )
    return lr


def _check_params(params: object) -> list:
    """The parameters as a list; a model, or frozen parameters, are refused with a hint."""
    if isinstance(params, nn.Module):
        raise TypeError(
            f"CABS takes the parameters, not the model ({type(params).__name__}): pass "
            "model.parameters(), or model.named_parameters() to give gradients as a dict "
            "keyed by name (goodfellow.EKFAC is the optimizer that takes a model)."
        )
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            "params must be an iterable of parameters, of (name, parameter) pairs, or of "
            f"parameter groups, got {type(params).__name__}."
        )
    params = list(params)
    for position, entry in enumerate(params):
        if isinstance(entry, dict):
            group = entry.get("params", ())
            entries = [group] if isinstance(group, Tensor) else list(group)
            entry["params"] = entries  # the list read here is the one torch reads next
        else:
            entries = [entry]
        for item in entries:
            name, param = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if isinstance(param, Tensor) and not param.requires_grad:
                which = repr(name) if name is not None else f"at position {position}"
                raise ValueError(
                    f"parameter {which} is frozen (requires_grad=False): it gets no gradient, "
                    "so CABS cannot step it nor count it in the gradient variance. Pass the "
                    "trainable parameters only, e.g. [(name, p) for name, p in "
                    "model.named_parameters() if p.requires_grad]."
                )
    return params


class CABS(torch.optim.Optimizer):
    r"""SGD with Coupled Adaptive Batch Sizes (Balles, Romero & Hennig 2017, arXiv:1612.05086).

    Plain SGD, :math:`\theta \leftarrow \theta - \alpha \bar g`, that also picks the size of the
    next batch. The paper bounds the expected gain of an SGD step and maximizes the gain per
    example seen; with the objective's minimum taken to be 0 the batch size that does so is

    .. math::

        m = \frac{\alpha \operatorname{tr}\Sigma(\theta)}{L(\theta)},

    where :math:`\Sigma` is the covariance of one example's gradient and :math:`L` the loss:
    small batches while the loss is large compared with the gradient noise, larger ones as
    training converges. This replaces a decaying learning rate. As in the reference
    (TensorFlow) code, the two noisy quantities are smoothed by exponential running averages
    with ``decay`` 0.95, started at :math:`\xi = 0` and :math:`L = 1` and updated before they
    are used:

    .. math::

        \xi \leftarrow \mu\xi + (1-\mu)\operatorname{tr}\hat\Sigma,

        \bar L \leftarrow \mu\bar L + (1-\mu)\tfrac1n\textstyle\sum_i L_i,

        m \leftarrow \operatorname{clip}\big(\lceil \alpha\xi/\bar L\rceil,
        m_\text{min}, m_\text{max}\big),

    with :math:`\operatorname{tr}\hat\Sigma = \frac1n\sum_i\|g_i\|^2 - \|\bar g\|^2` (the
    reference code's biased estimate; ``unbiased=True`` divides by ``n - 1``). The reference
    code rounds to the nearest integer; ``rounding="round"`` does the same, the default
    ``"ceil"`` never asks for less than the rule.

    ``step`` takes the per-example losses and the per-example gradients (or their factored
    form, which never materializes anything), writes :math:`\bar g` into ``p.grad``, updates the
    parameters and returns the next batch size, also kept in :attr:`batch_size`::

        cabs = CABS(model.parameters(), lr=0.1)
        for x, y in adaptive_batches(dataset, cabs, epochs=10):
            y_hat, activations, linear_combs = model(x)
            losses = F.cross_entropy(y_hat, y, reduction="none")     # (n,)
            linear_grads = torch.autograd.grad(losses.sum(), linear_combs)
            cabs.step(losses, mlp_factors(activations, linear_grads))

    Args:
        params: The parameters (or ``model.named_parameters()``, needed to pass per-example
            gradients as a dict). A single parameter group.
        lr: The learning rate :math:`\alpha \ge 0`. At :math:`\alpha = 0` (where a warm-up
            schedule such as ``LambdaLR(cabs, lambda s: s / 100)`` starts) the step moves
            nothing and the rule :math:`m = \alpha\xi/\bar L` asks for the smallest batch,
            ``bounds[0]``: a step of length 0 gains nothing whatever the batch, so the
            cheapest batch is the best one. The running averages are updated as at any lr.
        bounds: ``(min_batch_size, max_batch_size)``, default ``(16, 2048)``; with
            ``unbiased=True`` the smallest must be at least 2.
        decay: The running averages' constant :math:`\mu \in [0, 1)`, default 0.95.
        initial_batch_size: The first batch's size; default ``bounds[0]``.
        rounding: ``"ceil"`` (default) or ``"round"`` (the reference code; half to even).
        unbiased: Estimate :math:`\operatorname{tr}\Sigma` with ``n - 1``.
        group: A ``torch.distributed`` process group for data-parallel training: every rank
            passes its share's losses and per-example gradients to :meth:`step`, and the
            variance, the mean gradient and the mean loss are those of the global batch (sums
            all-reduced, see :doc:`/scaling_out`), so every rank takes the same step and
            chooses the same next global batch size (draw the shares with
            ``AdaptiveBatchSampler(..., num_replicas=W, rank=r)``). A rank's share may be
            empty. ``None``: this process only.

    Numbers may be Python's or NumPy's (``np.float32(0.1)``, ``np.int64(16)``).

    Raises:
        TypeError: If ``params`` is a model (pass ``model.parameters()``) or not an
            iterable, or a number has the wrong type.
        ValueError: If ``lr < 0``, the bounds are out of order or below 1 (below 2 with
            ``unbiased=True``), ``decay`` is outside ``[0, 1)``, ``initial_batch_size`` is
            outside the bounds, ``rounding`` is unknown, a parameter is frozen, or there is
            more than one parameter group.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        lr: float,
        bounds: tuple[int, int] = (16, 2048),
        decay: float = 0.95,
        initial_batch_size: int | None = None,
        rounding: str = "ceil",
        unbiased: bool = False,
        group: object = None,
    ) -> None:
        params = _check_params(params)
        lr = _check_lr(lr)
        low, high = _check_bounds(bounds)
        if unbiased and low < 2:
            raise ValueError(
                f"unbiased=True divides the gradient variance by n - 1, which needs batches of "
                f"at least 2 examples, but bounds {bounds!r} allow a batch of {low}: raise the "
                "smallest batch size to 2, or use unbiased=False."
            )
        if not is_real(decay) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
        if initial_batch_size is None:
            initial_batch_size = low
        if not is_integer(initial_batch_size):
            raise TypeError(f"initial_batch_size must be an integer, got {initial_batch_size!r}.")
        initial_batch_size = int(initial_batch_size)
        if not low <= initial_batch_size <= high:
            raise ValueError(
                f"initial_batch_size {initial_batch_size} lies outside the bounds {bounds!r}."
            )
        if rounding not in ("ceil", "round"):
            raise ValueError(f"rounding must be 'ceil' or 'round', got {rounding!r}.")
        defaults = {"lr": lr, "bounds": (low, high), "decay": float(decay)}
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "CABS couples one learning rate to the batch size: pass a single parameter "
                f"group, got {len(self.param_groups)}."
            )
        self.rounding = rounding
        self.unbiased = bool(unbiased)
        self.group = group
        self.state["cabs"] = {
            "variance_avg": 0.0,
            "loss_avg": 1.0,
            "batch_size": initial_batch_size,
            "variance": math.nan,
            "loss": math.nan,
            "steps": 0,
        }

    def state_dict(self) -> dict:
        """The optimizer's state, with a copy of CABS's running averages."""
        state = super().state_dict()
        state["state"]["cabs"] = dict(state["state"]["cabs"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`."""
        super().load_state_dict(state_dict)
        self.state["cabs"] = dict(self.state["cabs"])

    @property
    def batch_size(self) -> int:
        """The size CABS asks for the next batch."""
        return int(self.state["cabs"]["batch_size"])

    @property
    def last_variance(self) -> float:
        r"""The last step's :math:`\operatorname{tr}\hat\Sigma` (before averaging)."""
        return float(self.state["cabs"]["variance"])

    @property
    def last_loss(self) -> float:
        """The last step's mean loss (before averaging)."""
        return float(self.state["cabs"]["loss"])

    @torch.no_grad()
    def _apply(self, mean: PerExampleGrads, lr: float) -> None:
        group = self.param_groups[0]
        if isinstance(mean, Mapping):
            if "param_names" not in group:
                raise TypeError(
                    "the gradients are keyed by name: construct CABS with "
                    "model.named_parameters() so they can be matched to the parameters."
                )
            names = list(group["param_names"])
            missing = [name for name in names if name not in mean]
            unknown = [key for key in mean if key not in names]
            if missing or unknown:
                frozen = [
                    name
                    for name, p in zip(names, group["params"])
                    if name in missing and not p.requires_grad
                ]
                why = (
                    f" {frozen} were frozen (requires_grad=False) after CABS was built: build "
                    "CABS from the trainable parameters only."
                    if frozen
                    else ""
                )
                raise ValueError(
                    f"the gradients must cover exactly CABS's parameters; missing {missing}, "
                    f"unknown {unknown}.{why}"
                )
            ordered = [mean[name] for name in names]
        else:
            ordered = list(mean)
        assign_grads(group["params"], ordered)
        for p in group["params"]:
            p.add_(p.grad, alpha=-lr)

    @without_autocast
    def step(  # type: ignore[override]
        self,
        losses: Tensor,
        per_example_grads: PerExampleGrads | LinearFactors | Sequence[LinearFactors],
    ) -> int:
        r"""One SGD step on the batch's mean loss, and the batch size for the next one.

        Args:
            losses: The per-example losses :math:`L_i \geq 0` of the batch, shape ``(n,)``
                (e.g. ``reduction="none"``); only their values are used.
            per_example_grads: The gradients of the :math:`L_i`: a list or tuple in the order
                of the parameters, a dict keyed by parameter name (construct CABS with
                ``model.named_parameters()``), or their factored form
                (:func:`goodfellow.mlp_factors`, or
                a dict of :class:`goodfellow.LinearFactors` keyed by module name).

        Returns:
            The next batch size, an integer within the bounds.

        Raises:
            TypeError: If ``losses`` is not a tensor.
            ValueError: If ``losses`` is not a finite, non-negative ``(n,)`` tensor, its ``n``
                differs from the gradients', the gradients are not finite, the learning rate was
                set to a negative value, or the gradients do not match the parameters.
        """
        group = self.param_groups[0]
        lr = _check_lr(group["lr"])
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a tensor of shape (n,), got {type(losses).__name__}.")
        if losses.dim() != 1 or (losses.shape[0] == 0 and self.group is None):
            raise ValueError(
                f"losses must hold one loss per example, shape (n,), got {tuple(losses.shape)}; "
                "compute them with reduction='none'."
            )
        losses = losses.detach()
        if not bool(torch.isfinite(losses).all()):
            raise ValueError("losses hold NaN or inf: the training diverged; lower lr.")
        if bool((losses < 0).any()):
            raise ValueError(
                "CABS needs non-negative losses: its rule divides by the loss, taking the "
                f"minimum to be 0; got a loss of {losses.min().item():g}. Shift the loss."
            )
        n = _layers(per_example_grads, allow_empty=self.group is not None)[2]
        if n != losses.shape[0]:
            raise ValueError(
                f"losses hold {losses.shape[0]} examples but the gradients {n}: pass both for "
                "the same batch."
            )
        with torch.no_grad():
            trace, mean, _ = _trace_mean_total(per_example_grads, self.unbiased, self.group)
        if not math.isfinite(float(trace)):
            # caught before the running average, which would stay NaN for good
            raise ValueError(
                "the per-example gradients hold NaN or inf (their variance is not finite): "
                "the training diverged; lower lr. Nothing was changed."
            )
        # assign_grads checks the gradients against the parameters: a refused step changes nothing
        self._apply(mean, lr)
        # The biased trace is a mean of squares minus a square: never negative but for rounding.
        variance = max(float(trace), 0.0)
        loss_sum = torch.stack([losses.sum(), losses.new_tensor(float(losses.shape[0]))])  # (2,)
        loss_sum, count = _all_reduce([loss_sum], self.group)[0].tolist()
        loss = loss_sum / count
        state = self.state["cabs"]
        decay = group["decay"]
        state["variance_avg"] = decay * state["variance_avg"] + (1 - decay) * variance
        state["loss_avg"] = decay * state["loss_avg"] + (1 - decay) * loss
        state["variance"], state["loss"] = variance, loss
        state["steps"] += 1
        state["batch_size"] = self._next_batch_size(lr, state["variance_avg"], state["loss_avg"])
        return state["batch_size"]

    def _next_batch_size(self, lr: float, variance_avg: float, loss_avg: float) -> int:
        low, high = self.param_groups[0]["bounds"]
        if loss_avg <= 0:  # only reachable when every loss so far was 0 and decay is 0
            return high
        raw = lr * variance_avg / loss_avg
        if not math.isfinite(raw) or raw >= high:
            return high
        rounded = math.ceil(raw) if self.rounding == "ceil" else round(raw)
        return int(min(max(rounded, low), high))
