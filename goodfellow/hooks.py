r"""Per-example gradients of any model, recorded by hooks during its own backward.

:class:`goodfellow.MLP` hands out its layers' inputs and outputs because its ``forward`` was
written to. Any other model can be made to do the same without touching its code: a *forward
hook* on every module with a rule keeps the module's input :math:`a`, and a *tensor hook* on its
output :math:`Z` receives :math:`\partial \mathcal{L} / \partial Z` during ``loss.backward()``.
The recorder holds no formula: each module's rule (:mod:`goodfellow.layers`) turns what was
recorded for it into per-example gradients, norms, weighted sums and Kronecker factors.

A module applied at several positions of an example and called several times in one forward
adds up over both; how is its rule's business (a Linear's calls and positions are stacked into
one batched outer product, derived in :mod:`goodfellow.layers.linear`).

The hooks need :math:`\partial\mathcal{L}/\partial Z` and nothing else, so
:meth:`PerExampleGradients.backward` can replace ``loss.backward()`` (the Goodfellow trick's
``autograd.grad(loss, Zs)``, for any model), and :meth:`PerExampleGradients.backward_with_norms`
takes each layer's norms inside that backward.

The batch-size factor. Autograd hands the hook the gradient of the *batch* loss
:math:`\mathcal{L}`. For ``loss_reduction="sum"`` (:math:`\mathcal{L} = \sum_i L_i`) that is already
:math:`\delta_i`; for ``"mean"`` (:math:`\mathcal{L} = \frac1n \sum_i L_i`) it is
:math:`\delta_i / n`, and it must be multiplied by :math:`n` (see
:func:`goodfellow.batch_size_factor`). Multiplying by :math:`n` unconditionally, as many EKFAC
codes do, is right for a mean and wrong by a factor :math:`n` for a sum.

Why tensor hooks and not module backward hooks: the legacy ``register_backward_hook`` reports
the gradients of whatever autograd node ran last inside the module (for a Linear on a 3-d input,
a reshape), and ``register_full_backward_hook`` wraps the output in a custom function whose
result cannot be modified in place, so ``nn.ReLU(inplace=True)`` after a Linear raises. A hook
registered on the output tensor before an in-place operation receives the gradient with respect
to the value it had when the hook was registered: exactly
:math:`\partial\mathcal{L}/\partial Z`. (Private modules hold the parts: which rule claims
which module in ``goodfellow._claims``, what the hooks do in ``goodfellow._recording``, the
tensor-hook plumbing in ``goodfellow._hooking``, the results put together in
``goodfellow._assembly``, the norms taken during the backward in ``goodfellow._norm_stream``.)

What is needed for the results to be per-example gradients, and what is checked:

* every recorded call sees the batch on its batch dimension, with as many examples as the
  model's own input: a position embedding looked up on ``arange(T)`` and broadcast over the
  batch, or a reshape of ``(n, T, d)`` to ``(n * T, d)``, is refused;
* every use of a recorded parameter goes through its module: a parameter that receives more
  gradient than its module's calls account for (``F.linear(x, layer.weight)`` beside the layer)
  is refused when the results are read (checked on the first ``CHECK_FIRST`` batches after
  :meth:`PerExampleGradients.attach` and every ``CHECK_EVERY``-th after, a few small products per
  layer). ``nn.MultiheadAttention``'s rule claims ``out_proj``;
* BatchNorm in training mode mixes the examples and is refused; activation checkpointing
  (``torch.utils.checkpoint``) reruns layers inside the backward and is refused; a module
  returning a tuple is recorded through its first output, and a backward through its other
  outputs is refused.

What cannot be detected, and stays the user's to ensure:

* nothing else in the model or the loss mixes the examples of a batch (``h - h.mean(0)``,
  ``F.batch_norm(training=True)``, a pairwise or contrastive loss): the hooks see only each
  layer's own input and output gradient. :func:`goodfellow.check_per_example_gradients`
  compares the recorder with ``torch.func`` on your model and batch and names the parameters
  that disagree: run it once on a new model;
* a sequence-first layout whose sequence length equals the batch size (``(T, n, d)`` with
  ``T == n``) looks exactly like a batch-first one; so does a position embedding on
  ``arange(T)`` when ``T == n``;
* a custom layer handled by the ``torch.func`` fallback rule (:mod:`goodfellow.layers.fallback`)
  is trusted to treat its examples independently.

Modules with trainable parameters and no rule of their own get that fallback rule, for which
the recorder keeps every call's arguments. A call's input is held by the hook on its output
until the call's backward arrives, so a forward nobody differentiates frees it with its graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import goodfellow.layers  # noqa: F401  (registers the rules of every layer kind)
from goodfellow._accounting import (
    CHECK_EVERY,  # noqa: F401  (read as goodfellow.hooks.CHECK_EVERY, like the docstrings say)
    CHECK_FIRST,  # noqa: F401  (same)
)
from goodfellow._assembly import assemble, keep_workspace, reusable_workspace
from goodfellow._claims import claim_modules
from goodfellow._hooking import (
    _inert_hook,  # noqa: F401  (models pickled before the plumbing moved name it here)
    _make_inert,  # noqa: F401  (same)
    remove_all,
)
from goodfellow._norm_stream import NormStream, backward_with_norms
from goodfellow._recording import backward_to_outputs, edges_to_recorded_outputs, register_hooks
from goodfellow.records import LayerRecord
from goodfellow.reduction import batch_size_factor

__all__ = ["LayerRecord", "PerExampleGradients"]


class PerExampleGradients:
    r"""Record per-example gradients of every layer of a model during its own backward.

    Used as a context manager around the ordinary training code::

        with PerExampleGradients(model, loss_reduction="mean") as pe:
            loss = nn.functional.cross_entropy(model(x), y)  # reduction="mean"
            loss.backward()
        pe.grads["fc1.weight"]  # (n, out, in): row i is the gradient of example i's own loss

    or attached for many steps (what an optimizer such as KFAC/EKFAC does)::

        pe = PerExampleGradients(model).attach()
        for x, y in loader:
            loss_fn(model(x), y).backward()   # the first forward after a backward: new batch
            use(pe.layers)                    # inputs and output gradients of every layer
        pe.detach()

    Batches. A batch is everything between a backward and the next one: it starts at
    :meth:`attach` (``__enter__``) and with the first forward after a recorded backward, and the
    previous batch's records and cached gradients are then dropped, so results are never stale
    and memory does not grow over a training loop. All forwards before a backward belong to the
    batch (the model may be called several times for one loss, like a Linear inside it) and must
    have the same number of examples. Forwards under ``torch.no_grad()`` or inside ``torch.func``
    transforms are not recorded, so evaluation in between is fine; a forward whose output never
    reaches the backward contributes zero. So does a layer a partial backward stops short of:
    ``torch.autograd.grad(loss, some_parameters)`` and ``loss.backward(inputs=...)`` run only as
    far back as those tensors need. Read what you need from one batch before running the
    model on the next.

    Nothing per-example is materialized unless asked for: :attr:`grads` is computed on first
    access and cached for the batch; :attr:`layers` costs only references to tensors autograd
    computes anyway.

    Args:
        model: Any ``nn.Module`` that treats the examples of a batch independently; each
            trainable parameter is claimed by one rule (see :mod:`goodfellow.layers`:
            Linear, convolutions, Embedding, norm layers, MultiheadAttention, and the
            ``torch.func`` fallback for any other module).
        loss_reduction: How the batch loss is reduced over examples, as in
            :func:`goodfellow.goodfellow_backprop`: ``"sum"`` (:math:`\sum_i L_i`) or ``"mean"``
            (:math:`\frac1n \sum_i L_i`; torch losses' default). A cross-entropy ``"mean"``
            with class weights or ignored targets divides by something else than ``n``, so
            its per-example gradients come out scaled wrongly: record such a loss with
            ``reduction="sum"``.
        reuse_buffers: If ``True``, :attr:`grads` writes each batch into the tensors it returned
            for the previous batch when their shapes still fit (saving the allocation of
            ``n * P`` numbers per step); tensors from an earlier batch are then overwritten.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``reuse_buffers`` not a bool.
        ValueError: If ``loss_reduction`` is not ``"sum"`` or ``"mean"``.
    """

    def __init__(
        self, model: nn.Module, loss_reduction: str = "sum", reuse_buffers: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
                "whose layers should be recorded."
            )
        batch_size_factor(loss_reduction, 1)  # raises ValueError for an unknown reduction
        if not isinstance(reuse_buffers, bool):
            raise TypeError(f"reuse_buffers must be True or False, got {reuse_buffers!r}.")
        self.model = model
        self.loss_reduction = loss_reduction
        self.reuse_buffers = reuse_buffers
        self.layers: dict[str, LayerRecord] = {}
        """Module name -> :class:`LayerRecord`, one per claimed module, filled at :meth:`attach`."""
        self._owners: dict[str, list[tuple[LayerRecord, str]]] = {}
        self._param_names: dict[tuple[str, str], str] = {}
        self._batchnorms: list[tuple[str, _BatchNorm]] = []
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._tensor_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached = False
        self._generation = 0
        self._batch_size: int | None = None
        self._model_batch_size: int | None = None  # of the model's forward running now, if any
        self._forward_start: dict[str, int] | None = None  # calls per record when it started
        self._totals: dict[str, Tensor] = {}  # the gradient autograd gave each parameter
        self._totals_autocast: torch.dtype | None = None  # their precision, if under autocast
        self._params: dict[str, nn.Parameter] = {}
        self._attached_at = 0
        self._backward_seen = False
        self._grads: dict[str, Tensor] | None = None
        self._workspace: dict[str, Tensor] | None = None
        self._workspace_storages: frozenset[int] = frozenset()  # where its buffers live
        self._stream: NormStream | None = None  # during backward_with_norms only
        self._consumed = False  # whether backward_with_norms dropped this batch's records

    # ------------------------------------------------------------------ attaching and detaching

    def attach(self) -> PerExampleGradients:
        """Check the model, register the hooks and start recording.

        Returns:
            ``self``, so that ``pe = PerExampleGradients(model).attach()`` works.

        Raises:
            ValueError: If a rule refuses a module's settings, a BatchNorm is in training mode
                or has trainable parameters, or the model has no module with a rule.
            RuntimeError: If already attached.
        """
        if self._attached:
            raise RuntimeError(
                "this PerExampleGradients is already attached; detach() it (or leave its "
                "`with` block) before attaching it again."
            )
        claims = claim_modules(self)
        self.layers, self._batchnorms = claims.layers, claims.batchnorms
        self._owners, self._param_names = claims.owners, claims.param_names
        self._params = dict(self.model.named_parameters())
        self._module_handles += register_hooks(self)
        # a recorder that nobody holds any more takes its hooks off the model
        self._finalizer = weakref.finalize(self, remove_all, self._module_handles)
        self._attached_at = self._generation
        self._attached = True
        self.clear()
        return self

    def detach(self) -> None:
        """Remove every hook this object registered; what was recorded stays readable.

        Safe to call more than once. A backward run after :meth:`detach` records nothing.
        """
        for handle in self._module_handles + self._tensor_handles:
            handle.remove()
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._module_handles = []
        self._tensor_handles = []
        self._attached = False

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model."""
        return self._attached

    def __enter__(self) -> PerExampleGradients:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()

    def clear(self) -> None:
        """Start a new batch now: drop the records and cached gradients (keep the workspace).

        A backward through a forward run before :meth:`clear` raises ``RuntimeError``.
        """
        self._generation += 1  # the tensor hooks of earlier forwards are now stale
        for record in self.layers.values():
            record.clear()
        self._tensor_handles = []
        self._batch_size = None
        self._backward_seen = False
        self._grads = None
        self._totals, self._totals_autocast = {}, None
        self._consumed = False

    # ------------------------------------------------------------------ a backward of its own

    def backward(self, loss: Tensor) -> None:
        r"""Backpropagate ``loss`` only as far as the recorded layers' outputs.

        The per-example route needs :math:`\partial\mathcal L/\partial Z` at every recorded
        call and nothing else: ``loss.backward()`` also forms every parameter's summed
        gradient, one more weight-gradient product per layer (for a convolution or a Linear on
        ``(n, T, d)`` the largest part of the backward), which a statistic built from the
        records (:func:`goodfellow.clipped_mean`, :func:`goodfellow.gradient_norms`,
        :attr:`grads`) then recomputes per example. This runs
        ``torch.autograd.grad(loss, outputs)`` to the outputs' autograd edges instead, so the
        hooks see exactly what ``loss.backward()`` would give them, and **no parameter's**
        ``.grad`` **is written** (put the statistic there with :func:`goodfellow.assign_grads`).

        On the batches whose sums are checked (the first ``CHECK_FIRST`` after :meth:`attach`,
        then every ``CHECK_EVERY``-th) the recorded parameters are differentiated as well, so
        that a parameter also used outside its module is still refused; ``.grad`` stays as is.

        Args:
            loss: The scalar batch loss of the forwards recorded since the last backward.

        Raises:
            TypeError: If ``loss`` is not a tensor.
            ValueError: If ``loss`` is not a scalar, or does not require grad.
            RuntimeError: If no forward of this batch was recorded.
        """
        backward_to_outputs(self, loss, edges_to_recorded_outputs(loss))

    def backward_with_norms(self, loss: Tensor) -> Tensor:
        r"""Backpropagate ``loss`` as :meth:`backward` does and return each example's gradient norm.

        The numbers of ``gradient_norms(recorded_factors(pe))``, but each layer's part is taken
        inside the backward as soon as the layer is complete, and its inputs and output
        gradients are dropped there (``goodfellow._norm_stream``): on a transformer that is
        most of what the norms would hold above a plain backward. A convolution's norms form
        its per-example gradients, more than its records: on a CNN the route after the
        backward peaks lower. Afterwards the batch is gone (:attr:`grads` and
        :func:`goodfellow.recorded_factors` raise until the next forward); a statistic that
        needs the gradients after their norms (a clipped mean) takes :meth:`backward`.

        Args:
            loss: The scalar batch loss of the forwards recorded since the last backward.

        Returns:
            Tensor of shape ``(n,)``: :math:`\|g_i\|_2` over every trainable parameter the
            recorder claims, with the batch-size factor of ``loss_reduction``.

        Raises:
            TypeError: If ``loss`` is not a tensor.
            ValueError: If ``loss`` is not a scalar that requires grad; before the backward, if
                :func:`goodfellow.recorded_factors` would refuse the layers (none trained, a
                frozen weight with a trained bias, a weight shared by several modules).
            RuntimeError: If no forward of this batch was recorded.
        """
        return backward_with_norms(self, loss)

    # ------------------------------------------------------------------ results

    @property
    def batch_size(self) -> int | None:
        """The number of examples ``n`` of the current batch, ``None`` before a forward."""
        return self._batch_size

    @property
    def backward_seen(self) -> bool:
        """Whether a backward of the current batch's forward has been recorded."""
        return self._backward_seen

    @property
    def batches_started(self) -> int:
        """How many batches have started since this recorder was created.

        :meth:`attach`, :meth:`clear` and the first forward after a backward each start one;
        a consumer such as an optimizer compares it between two of its steps to see whether
        several batches ran in between.
        """
        return self._generation

    @property
    def grads(self) -> dict[str, Tensor]:
        r"""Per-example gradients of the current batch, computed on first access and cached.

        Returns:
            Dict from parameter name (as in ``model.named_parameters()``, in that order, for
            every trainable parameter the recorder claims) to a tensor of shape
            ``(n, *param.shape)`` in the parameter's dtype whose row ``i`` is
            :math:`\nabla L_i` (under autocast the products are formed in the dtype the layer
            ran in, from its input rounded to it, as the layer's own backward does). With
            ``reuse_buffers=True`` the tensors are reused (overwritten) by the next batch.

        Raises:
            RuntimeError: If no forward, or no backward since the last forward, was recorded.
        """
        if self._grads is None:
            workspace = reusable_workspace(self)
            self._grads = assemble(self, workspace, kept=workspace is not None)
            keep_workspace(self, self._grads)
        return self._grads

    def compute_grads(self, out: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Compute the per-example gradients of the current batch (uncached).

        Each recorded module's rule gives its parameters' per-example gradients: a Linear's
        calls stacked along the position axis and reduced by one :func:`goodfellow.batched_outer`
        (``einsum("nto,nti->noi")``: ``n`` example, ``t`` position or call, ``o`` output, ``i``
        input feature), a convolution's on its unfolded patches per group, the other kinds as
        :mod:`goodfellow.layers` says. Tied weights add their parts.

        If the backward ran with ``create_graph=True``, the result is differentiable (it depends
        on the recorded inputs and output gradients through autograd), also while attached:
        later backwards through the same forward, such as the one that differentiates the
        result, are then not recorded.

        Args:
            out: Optional dict with the same keys as :attr:`grads`, holding preallocated
                contiguous tensors of shape ``(n, *param.shape)`` in the parameter's dtype and
                device; the results are written into them (no allocation of the ``n * P``
                numbers). Keep one such workspace across batches of equal size. Not allowed
                when the result must be differentiable.

        Returns:
            Dict from parameter name to its per-example gradients, shape
            ``(n, *param.shape)`` (the tensors of ``out`` when given).

        Raises:
            RuntimeError: If no forward, or no backward since the last forward, was recorded.
            TypeError: If ``out`` is not a dict of tensors.
            ValueError: If ``out`` has the wrong keys, shapes, dtypes or devices, is not
                contiguous, or the result must be differentiable.
        """
        return assemble(self, out)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"PerExampleGradients({type(self.model).__name__}, "
            f"loss_reduction={self.loss_reduction!r}, {len(self.layers)} recorded layers, {state})"
        )
