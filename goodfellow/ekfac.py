r"""The KFAC and EKFAC optimizers: the formulas of :mod:`goodfellow.kronecker` in a training loop.

:class:`EKFAC` (and :class:`KFAC`) is a ``torch.optim`` optimizer: it records :math:`\bar a` and
:math:`\delta` through :class:`goodfellow.PerExampleGradients`, keeps running averages of
:math:`A`, :math:`G` and :math:`S^*`, refreshes the eigenbasis every ``update_freq`` steps and
preconditions each layer's gradient; :mod:`goodfellow.kronecker` derives every quantity it uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from goodfellow._ekfac_checks import (
    _check_finite,
    _check_group,
    _check_layers,
    _check_model,
    _check_state_dict,
    _has_trainable_bias,
    _is_kronecker_layer,
    _refuse_param_group,
)
from goodfellow._ranks import _mean_over_ranks
from goodfellow.hooks import LayerRecord, PerExampleGradients
from goodfellow.kronecker import (
    KroneckerEigenbasis,
    ekfac_scalings,
    join_weight_bias,
    kfac_factors,
    kfac_scalings,
    kronecker_eigenbasis,
    precondition,
    split_weight_bias,
)

__all__ = ["EKFAC", "KFAC"]


class EKFAC(torch.optim.Optimizer):
    r"""EKFAC (or KFAC) preconditioned gradient descent: Linear and convolution layers.

    Used like any ``torch.optim`` optimizer, with one forward and one ``loss.backward()`` of
    the model per step::

        optimizer = goodfellow.EKFAC(model, lr=0.1, damping=1e-3, update_freq=10)
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)  # reduction="mean"
            loss.backward()
            optimizer.step()

    The optimizer keeps a :class:`goodfellow.PerExampleGradients` attached to the model (remove
    it with :meth:`remove_hooks`) and reads, for every Linear and ungrouped convolution, its
    inputs :math:`a` (unfolded patches) and per-example output gradients :math:`\delta`; no
    per-example gradient is materialized. Calls of a layer whose output did not reach the loss
    (a forward with gradients enabled, never differentiated) are left out of the statistics.

    Each step uses the curvature of **one batch**, the one whose ``backward()`` came last, so
    :meth:`step` refuses what would mix batches or lose one, instead of stepping wrongly:

    * a forward with gradients enabled after the ``backward()`` (an evaluation batch, or the
      forward of a ``copy.deepcopy`` of the model) starts a new batch without a backward: run
      evaluation under ``torch.no_grad()``;
    * gradient accumulation, several forward and ``backward()`` pairs before one step: ``.grad``
      sums the micro-batches, but KFAC's factors and EKFAC's scalings are second moments of
      one batch's per-example gradients and the recorder keeps the last micro-batch only. Step
      after every backward, or use one larger batch;
    * a batch left over from a forward that raised, or from a backward not meant for a step:
      drop it with :meth:`clear`.

    Per layer and step ``k`` (counted from 0), with :math:`\beta` = ``decay``:

    1. running averages of the KFAC factors,
       :math:`A \leftarrow \beta A + (1 - \beta) A_{batch}` and likewise :math:`G`
       (:func:`goodfellow.kfac_factors`; the first batch initializes them);
    2. if ``k % update_freq == 0``: a new eigenbasis of :math:`A` and :math:`G`
       (:func:`goodfellow.kronecker_eigenbasis`); the scalings restart from this batch, since
       the old ones belong to the old basis;
    3. EKFAC: running average of the scalings in the current basis,
       :math:`S \leftarrow \beta S + (1 - \beta) S^*_{batch}`
       (:func:`goodfellow.ekfac_scalings`, every step). KFAC:
       :math:`S = \lambda_G \lambda_A^\top` of the last eigenbasis
       (:func:`goodfellow.kfac_scalings`);
    4. :math:`[W \; b] \leftarrow [W \; b] - \eta\,` :func:`goodfellow.precondition`
       :math:`([\nabla_W \; \nabla_b], S, \lambda)`, i.e.
       :math:`\theta \leftarrow \theta - \eta (\hat F + \lambda I)^{-1} \nabla_\theta \mathcal{L}`
       with :math:`\nabla_\theta \mathcal{L}` the ``.grad`` autograd accumulated.

    :math:`\hat F` approximates the empirical Fisher :math:`\mathbb{E}_n[g_n g_n^\top]` of the
    examples' own losses, whatever the reduction. The preconditioned gradient is the batch
    loss's: with ``loss_reduction="sum"`` it is ``n`` times the mean's, and so is the step.

    Args:
        model: A module whose ``nn.Linear`` and ungrouped ``nn.Conv1d/2d/3d`` layers are
            preconditioned; a convolution's Kronecker factors come from its unfolded patches
            (KFC, Grosse & Martens 2016, arXiv:1602.01407): every output position counts as a
            position of KFAC-expand. Trainable parameters of other layers the recorder
            supports (grouped convolutions, and any layer without Kronecker factors) take a
            plain gradient-descent step with the same ``lr``.
        lr: Learning rate :math:`\eta \ge 0` (``0``, as a warm-up schedule starts, updates the
            statistics and leaves the parameters alone).
        damping: :math:`\lambda > 0`, added to every eigenvalue of :math:`\hat F`.
        update_freq: Recompute the eigenbases every ``update_freq`` steps (an integer
            :math:`\ge 1`); the scalings are updated every step. Like ``lr``, ``damping`` and
            ``decay`` it may be a NumPy scalar.
        decay: :math:`\beta \in [0, 1)`, the weight of the past in the running averages
            (``0``: use only the current batch).
        mode: ``"ekfac"`` (scalings :math:`S^*`) or ``"kfac"`` (eigenvalue products).
        loss_reduction: How the loss is reduced over the batch, ``"mean"`` (torch's default)
            or ``"sum"``; sets the batch-size factor that turns recorded output gradients into
            per-example ones.
        group: A ``torch.distributed`` process group over data-parallel workers: the batch
            statistics :math:`A`, :math:`G` and :math:`S^*` of every step are averaged over
            all ranks' examples (weighted by each rank's number of examples, as distributed
            K-FAC does: Osawa et al. 2019, Pauloski et al. 2020), so every rank holds the same
            preconditioner. The gradient is ``.grad`` as it is: wrap the model in
            ``DistributedDataParallel``, whose all-reduce makes it the global one. Two
            all-reduces per layer and step, of :math:`O(d_{in}^2 + d_{out}^2)` and
            :math:`O(d_{in} d_{out})` numbers.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or ``lr`` or ``damping`` is not a
            number.
        ValueError: If the model has no trainable Linear or ungrouped convolution, the
            recorder refuses a module, weights are tied, or an argument is out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float = 1e-3,
        update_freq: int = 10,
        decay: float = 0.95,
        mode: str = "ekfac",
        loss_reduction: str = "mean",
        group: object = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        defaults = _check_group(
            {"lr": lr, "damping": damping, "update_freq": update_freq, "decay": decay}
        )
        _check_model(model, mode)
        recorder = PerExampleGradients(model, loss_reduction=loss_reduction)
        try:
            recorder.attach()
        except ValueError as error:
            raise ValueError(f"EKFAC cannot precondition this model: {error}") from error
        # A Linear inside a module that uses its weight itself (nn.MultiheadAttention's
        # out_proj) belongs to that module's rule: it has no record, and no Kronecker factors.
        linears = [
            (name, module)
            for name, module in model.named_modules()
            if _is_kronecker_layer(module)
            and module.weight.requires_grad
            and name in recorder.layers
        ]
        try:
            _check_layers(model, linears)
        except ValueError:
            recorder.detach()
            raise
        self.model = model
        self.mode = mode
        self.loss_reduction = loss_reduction
        self.group = group
        self.recorder = recorder
        """The :class:`goodfellow.PerExampleGradients` that records each batch."""
        self._layers = {name: module for name, module in linears}
        params = [
            p for module in self._layers.values() for p in module.parameters() if p.requires_grad
        ]
        # Parameters of layers without Kronecker factors (norm layers, embeddings, grouped
        # convolutions): plain gradient descent with the same lr.
        kronecker = {id(p) for p in params}
        self._plain = [p for p in model.parameters() if p.requires_grad and id(p) not in kronecker]
        params = params + self._plain
        self._building = True  # torch.optim.Optimizer.__init__ adds the one group itself
        super().__init__(params, defaults)
        self._building = False
        # The recorder counts the batches it started (attach() started one); a step sees the
        # count it left behind unless a second batch was recorded in between.
        self._batches_at_step = recorder.batches_started

    def remove_hooks(self) -> None:
        """Take the recording hooks off the model; :meth:`step` then refuses to run."""
        self.recorder.detach()

    def clear(self) -> None:
        """Drop the batch recorded since the last step, so the next forward starts afresh.

        For a forward that raised half-way (a bad batch skipped with ``try``/``except``: its
        first layers were recorded, and a next batch of another size would be refused as part
        of it), or a forward and backward not meant for a step. The gradients in ``.grad`` are
        left alone: call ``zero_grad()`` as well if a backward ran. Clear through this
        method, not through ``recorder.clear()``: :meth:`step` would take a batch cleared behind
        its back for a second, accumulated one.
        """
        self.recorder.clear()
        self._batches_at_step = self.recorder.batches_started

    def add_param_group(self, param_group: dict) -> None:
        """Refused: EKFAC optimizes its model's parameters as one group, built from the model.

        Raises:
            ValueError: Always, once the optimizer is built (a group added later would never
                be preconditioned nor stepped).
        """
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        _refuse_param_group()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` of an EKFAC (or KFAC) of the same model.

        The state is checked against this optimizer before anything is loaded: its number of
        parameters, the mode (a KFAC state has no scalings), and the shape of every saved
        statistic of every layer, so that a state of another model fails here, naming the
        layer, and not at a later step with a ``KeyError`` or a size mismatch.

        Args:
            state_dict: What ``state_dict()`` returned.

        Raises:
            TypeError: If ``state_dict`` is not a dict with ``"state"`` and ``"param_groups"``.
            ValueError: If it belongs to another mode, or to a model with other layers or
                widths.
        """
        _check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Precondition every Linear and convolution layer; every other parameter: plain SGD.

        Args:
            closure: Optional function that clears the gradients, runs the forward and
                ``loss.backward()`` and returns the loss (as for any torch optimizer).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            TypeError: If ``param_groups[0]`` was given a non-numeric ``lr`` or ``damping``.
            ValueError: If ``param_groups[0]`` was given an out-of-range ``lr``, ``damping``,
                ``update_freq`` or ``decay`` since construction (nothing is changed then).
            RuntimeError: If the hooks were removed, no forward and backward of the model
                was recorded since the last step, a forward with gradients enabled ran after the
                backward (an evaluation outside ``torch.no_grad()``), or several batches were
                recorded since the last step (gradient accumulation). Nothing is changed then.
            FloatingPointError: If a layer's curvature statistics are not finite (nothing is
                changed then, and the batch is dropped, as by :meth:`clear`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.recorder.attached:
            raise RuntimeError("EKFAC's hooks were removed (remove_hooks()); it cannot step.")
        if self.recorder.batch_size is None:
            raise RuntimeError(
                "EKFAC.step() found no batch recorded since the last step: run the model's "
                "forward and loss.backward() (with gradients enabled) before every step."
            )
        if not self.recorder.backward_seen:
            raise RuntimeError(
                "EKFAC.step() found a forward of the model without a backward: a forward with "
                "gradients enabled after loss.backward() (an evaluation batch, or a copy of the "
                "model) starts a new batch, and the one backward() belonged to is gone. Run "
                "evaluation under torch.no_grad(), or call loss.backward() before step(); "
                "optimizer.clear() drops a forward that is not meant for a step."
            )
        started = self.recorder.batches_started - self._batches_at_step + 1
        if started > 1:
            raise RuntimeError(
                f"EKFAC.step() found {started} batches recorded since the last step (a forward "
                "and backward() before the last forward and backward(), as in gradient "
                "accumulation over micro-batches): .grad sums them, but EKFAC's curvature "
                "statistics are per batch and only the last one is kept, so the step would be "
                "wrong. Call step() after every backward(), or use one larger batch; call "
                "optimizer.clear() (not optimizer.recorder.clear()) to drop a batch not meant "
                "for a step."
            )
        hyper = _check_group(self.param_groups[0])
        updates = []
        try:
            for name, module in self._layers.items():
                record = self.recorder.layers[name]
                reached = any(g is not None for g in record.grad_outputs)
                if module.weight.grad is None or not reached:
                    continue  # the layer took no part in this loss, like torch optimizers skip it
                updates.append(self._layer_update(name, module, record, hyper))
        except FloatingPointError:
            self.clear()  # the batch is unusable: the next one must not count as accumulated
            raise
        # Parameters change only once every layer's statistics were found finite.
        for module, new_state, step in updates:
            self.state[module.weight].update(new_state)
            weight, bias = split_weight_bias(step, _has_trainable_bias(module))
            module.weight.add_(weight.reshape(module.weight.shape), alpha=-hyper["lr"])
            if bias is not None:
                module.bias.add_(bias, alpha=-hyper["lr"])
        for param in self._plain:
            if param.grad is not None:
                param.add_(param.grad, alpha=-hyper["lr"])
        self.clear()  # the batch is used: the next step needs a new one
        return loss

    def _layer_update(
        self, name: str, module: nn.Linear, record: LayerRecord, group: dict
    ) -> tuple[nn.Linear, dict[str, Tensor | int], Tensor]:
        """The new state and the preconditioned gradient of one layer (state not yet written)."""
        state = self.state.get(module.weight, {})  # .get: a failed step leaves no trace
        step = state.get("step", 0)
        decay = group["decay"]
        has_bias = _has_trainable_bias(module)
        layer = f"{type(module).__name__} {name!r}"  # as refusals name it
        # The layer's rule gives the inputs (unfolded patches for a convolution, with a column
        # of ones for a bias) and the per-example output gradients of every call that reached
        # the loss; a call that did not (an evaluation with gradients enabled) stays out of A.
        a, delta = record.gradients().kronecker_factors()
        a, delta = a.to(module.weight.dtype), delta.to(module.weight.dtype)  # autocast: back
        A_batch, G_batch = kfac_factors(a, delta)
        n, positions = a.shape[0], math.prod(a.shape[1:-1])
        if self.group is not None:  # the factors of the global batch: means over its examples
            A_batch, G_batch = _mean_over_ranks(
                [A_batch, G_batch], [n * positions, n], self.group
            )
        _check_finite(A_batch, "input factor A", layer, step)
        _check_finite(G_batch, "output-gradient factor G", layer, step)
        new: dict[str, Tensor | int] = {"step": step + 1}
        if step == 0:
            new["A"], new["G"] = A_batch, G_batch
        else:
            new["A"] = torch.lerp(A_batch, state["A"], decay)  # β A + (1 - β) A_batch
            new["G"] = torch.lerp(G_batch, state["G"], decay)
        if step % group["update_freq"] == 0:
            basis = kronecker_eigenbasis(new["A"], new["G"])
            new.update(zip(_BASIS_KEYS, basis))
        else:
            basis = KroneckerEigenbasis(*(state[key] for key in _BASIS_KEYS))
        if self.mode == "kfac":
            scalings = kfac_scalings(basis)  # (d_out, d_in + 1)
        else:
            scalings_batch = ekfac_scalings(a, delta, basis)  # (d_out, d_in + 1)
            if self.group is not None:
                (scalings_batch,) = _mean_over_ranks([scalings_batch], [n], self.group)
            _check_finite(scalings_batch, "EKFAC scalings", layer, step)
            if step % group["update_freq"] == 0:
                scalings = scalings_batch
            else:
                scalings = torch.lerp(scalings_batch, state["scalings"], decay)
            new["scalings"] = scalings
        bias_grad = None
        if has_bias:
            bias_grad = module.bias.grad
            bias_grad = torch.zeros_like(module.bias) if bias_grad is None else bias_grad
        grad = join_weight_bias(module.weight.grad.flatten(1), bias_grad)  # (d_out, d_in + 1)
        preconditioned = precondition(grad, basis, scalings, group["damping"])
        _check_finite(preconditioned, "preconditioned gradient", layer, step)
        return module, new, preconditioned


_BASIS_KEYS = KroneckerEigenbasis._fields


class KFAC(EKFAC):
    r"""KFAC: :class:`EKFAC` with ``mode="kfac"``.

    Each layer's gradient is preconditioned by :math:`(G \otimes A + \lambda I)^{-1}` (exact
    Tikhonov damping of the Kronecker product, computed in its eigenbasis).

    Args:
        model: As for :class:`EKFAC`.
        lr: Learning rate :math:`\eta \ge 0`.
        damping: :math:`\lambda > 0`.
        update_freq: Steps between two eigendecompositions of the factors.
        decay: Weight of the past in the running averages of :math:`A` and :math:`G`.
        loss_reduction: ``"mean"`` or ``"sum"``, as for :class:`EKFAC`.
        group: A process group: factors averaged over data-parallel ranks, as for
            :class:`EKFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float = 1e-3,
        update_freq: int = 10,
        decay: float = 0.95,
        loss_reduction: str = "mean",
        group: object = None,
    ) -> None:
        super().__init__(model, lr, damping, update_freq, decay, "kfac", loss_reduction, group)
