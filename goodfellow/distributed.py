r"""The gradient noise scale of any DDP model, without per-example gradients.

McCandlish et al. 2018 (arXiv:1812.06162, appendix A) estimate the noise scale
:math:`\mathcal B = \operatorname{tr}\Sigma / |G|^2` from the squared norms of two batch
gradients of different sizes. The expected squared norm of a mean gradient over :math:`b`
independent examples is

.. math::

    \mathbb E\,\|g_b\|^2 = |G|^2 + \frac{\operatorname{tr}\Sigma}{b},

a line in :math:`1/b`; two batch sizes give two points and the line's intercept and slope are
:math:`|G|^2` and :math:`S = \operatorname{tr}\Sigma`. Data-parallel training has both for
free: each rank's local gradient (small batch :math:`b_r`) before DistributedDataParallel's
all-reduce, and the averaged gradient after it.

With shares of equal size :math:`b` over :math:`W` ranks (big batch :math:`B = Wb`) the
paper's unbiased estimates are

.. math::

    |G|^2 \approx \frac{B\|g_B\|^2 - b\,\overline{\|g_b\|^2}}{B - b}, \qquad
    S \approx \frac{\overline{\|g_b\|^2} - \|g_B\|^2}{1/b - 1/B},

with :math:`\overline{\|g_b\|^2}` the mean over ranks. :class:`NoiseScaleHook` uses the form
that stays unbiased when the shares differ. DDP's gradient is the plain average
:math:`\bar g = \frac1W\sum_r g_r` of the ranks' mean gradients, so with
:math:`H = \sum_r 1/b_r`,

.. math::

    \mathbb E \sum_r \|g_r\|^2 = W|G|^2 + H S, \qquad
    \mathbb E\,\|\bar g\|^2 = |G|^2 + \frac{H}{W^2} S,

two linear equations whose solution is

.. math::

    S \approx \frac{W\big(\sum_r\|g_r\|^2 - W\|\bar g\|^2\big)}{H (W - 1)}, \qquad
    |G|^2 \approx \|\bar g\|^2 - \frac{H}{W^2} S.

For equal shares (:math:`H = W/b`) these are the paper's formulas. Both estimates are noisy
and :math:`|G|^2` can come out negative, so, as the paper says, each is averaged over steps
before the ratio is taken (an exponential moving average here).
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects
import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

__all__ = ["NoiseScaleHook"]


class NoiseScaleHook:
    r"""Track the gradient noise scale of a DistributedDataParallel model during training.

    Registers a DDP communication hook (``ddp_model.register_comm_hook``) that, for every
    gradient bucket, takes the squared norm of the rank's local gradient before the all-reduce
    and of the averaged gradient after it; DDP's gradient itself is unchanged (the same average
    as DDP's default hook). The two numbers the estimates need from every rank,
    :math:`\|g_r\|^2` and :math:`1/b_r`, are appended to the last bucket's all-reduce (a
    float16 or bfloat16 bucket sends them in an all-reduce of their own, in float64). The
    estimates of the module docstring are brought up to date when a result is read, or at the
    next backward if none was. Nothing else crosses the network.

    Each step's estimates :math:`S_t` and :math:`|G|^2_t` are smoothed by exponential moving
    averages, :math:`m_t = \beta m_{t-1} + (1-\beta) x_t`, divided by :math:`1 - \beta^t` (as
    Adam does) so that the first steps are not pulled towards the start value 0;
    :attr:`noise_scale` is the ratio of the two averages. All ranks hold the same numbers.

    The local loss must be the mean over the rank's examples (torch losses' default), so that
    a rank's gradient is the mean gradient of its :math:`b_r` examples. Steps under
    ``ddp_model.no_sync()`` do not all-reduce and are not counted; a step with gradient
    accumulation over several micro-batches counts as one batch of their total size.

    Example::

        model = DistributedDataParallel(net)
        noise = NoiseScaleHook(model, batch_size=32, decay=0.95)
        for x, y in loader:
            noise.batch_size = len(x)      # this rank's share, if it varies
            loss_fn(model(x), y).backward()
            optimizer.step(); optimizer.zero_grad()
            print(noise.noise_scale)

    Args:
        ddp_model: A :class:`torch.nn.parallel.DistributedDataParallel` model before its first
            backward; a model takes one communication hook, so this replaces none.
        batch_size: This rank's number of examples per step, :math:`b_r \ge 1`; set
            :attr:`batch_size` before a backward when it changes. ``None``: set it before the
            first backward.
        decay: :math:`\beta \in [0, 1)` of the moving averages (``0``: no smoothing).

    Raises:
        TypeError: If ``ddp_model`` is not a DistributedDataParallel model.
        ValueError: If the process group has a single rank (no second batch size), or
            ``decay`` or ``batch_size`` are out of range.
    """

    def __init__(
        self, ddp_model: DistributedDataParallel, batch_size: int | None = None,
        decay: float = 0.95,
    ) -> None:
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                "NoiseScaleHook needs a torch.nn.parallel.DistributedDataParallel model, got "
                f"{type(ddp_model).__name__}; wrap the model in DistributedDataParallel first."
            )
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self._batch_size: int | None = None
        if batch_size is not None:
            self.batch_size = batch_size
        self.group = ddp_model.process_group
        self.world_size = dist.get_world_size(self.group)
        if self.world_size < 2:
            raise ValueError(
                "the noise scale from DDP's all-reduce needs at least 2 ranks (two batch sizes), "
                "got 1; use goodfellow.gradient_noise_scale with per-example gradients instead."
            )
        self._steps = 0
        self._averages: tuple[float, float] | None = None  # running S, |G|^2 (not debiased)
        self._last: tuple[float, float] | None = None  # this step's S and |G|^2
        self._local: list[float] = []  # this step's per-bucket local squared norms
        self._reduced_norms: list[float] = []  # |g_bar|^2 of this step's other buckets
        # the last step's all-reduce, averaged last bucket and reduced numbers, until read
        self._pending: tuple[torch.futures.Future, Tensor | None, Tensor] | None = None
        self._packed: Tensor | None = None  # the last bucket's buffer plus the two numbers
        ddp_model.register_comm_hook(None, self._hook)

    @property
    def batch_size(self) -> int | None:
        """This rank's number of examples in the next backward, :math:`b_r`."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"batch_size must be this rank's number of examples, an int >= 1, got {value!r} "
                "(a rank with no example has no mean gradient)."
            )
        self._batch_size = value

    # ------------------------------------------------------------------ the communication hook

    def _hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        if self._batch_size is None:
            raise RuntimeError(
                "NoiseScaleHook.batch_size is not set: set it to this rank's number of examples "
                "before the backward."
            )
        self._settle()  # a step nobody read yet: its numbers, before its buffer is reused
        buffer = bucket.buffer()  # (bucket numel,) this rank's mean gradient
        self._local.append(_squared_norm(buffer))
        if not bucket.is_last():
            _average(buffer, self.world_size, out=buffer)  # DDP's default: the rank average
            work = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
            return work.then(self._reduced_norm)
        scalars = [sum(self._local), 1.0 / self._batch_size]  # |g_r|^2, 1/b_r
        self._local = []
        numel = buffer.numel()
        if torch.finfo(buffer.dtype).bits < 32:
            # half precision would round the two numbers too coarsely: a float64 all-reduce
            # of their own
            _average(buffer, self.world_size, out=buffer)
            summed = torch.tensor(scalars, dtype=torch.float64)
            numbers = dist.all_reduce(summed, group=self.group, async_op=True).get_future()
            self._pending = (numbers, None, summed)
            work = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
            return work.then(self._reduced_norm)
        # The two numbers ride in the last bucket's all-reduce, in its dtype (float32: a
        # relative rounding of 6e-8, that of the gradient entries themselves): one collective
        # per bucket, exactly as many as without the hook. The buffer is kept from step to
        # step, so packing costs one pass over the bucket, the one that averages it, and the
        # averaged gradient stays there (DDP copies it out) until it is read.
        packed = self._packed_buffer(buffer)  # (numel + 2,)
        _average(buffer, self.world_size, out=packed[:numel])
        packed[numel:] = torch.tensor(scalars, dtype=packed.dtype)
        work = dist.all_reduce(packed, group=self.group, async_op=True).get_future()
        self._pending = (work, packed[:numel], packed[numel:])
        return work.then(lambda fut: fut.value()[0][:numel])

    def _reduced_norm(self, fut: torch.futures.Future) -> Tensor:
        """An averaged bucket DDP will copy out and reuse: its squared norm now."""
        averaged = fut.value()[0]
        self._reduced_norms.append(_squared_norm(averaged))
        return averaged

    def _settle(self) -> None:
        r"""The last step's estimates, from its reduced numbers and :math:`\|\bar g\|^2`.

        The last bucket's squared norm is taken here, when the results are read or at the next
        backward, not in the all-reduce's callback: there it delayed DDP's wait for the
        gradient, in the process group's thread (measured on 2 CPU ranks, three launches of
        interleaved steps: about 5% of a plain DDP step more than without it).
        """
        if self._pending is None:
            return
        work, averaged, summed = self._pending
        self._pending = None
        work.wait()
        squared_mean = sum(self._reduced_norms)  # |g_bar|^2
        if averaged is not None:
            squared_mean += _squared_norm(averaged)
        self._reduced_norms = []
        local_sum, inverse_sizes = summed.tolist()  # sum_r |g_r|^2, H
        self._update(local_sum, inverse_sizes, squared_mean)

    def _packed_buffer(self, bucket_buffer: Tensor) -> Tensor:
        """The last bucket's all-reduce buffer, two entries longer, made once per bucket shape."""
        numel = bucket_buffer.numel() + 2
        packed = self._packed
        if packed is None or (packed.numel(), packed.dtype, packed.device) != (
            numel, bucket_buffer.dtype, bucket_buffer.device
        ):
            packed = self._packed = bucket_buffer.new_empty(numel)
        return packed

    def _update(self, local_sum: float, inverse_sizes: float, squared_mean: float) -> None:
        """Both estimates of this step and their moving averages (Python floats, float64)."""
        w = self.world_size
        trace = w * (local_sum - w * squared_mean) / (inverse_sizes * (w - 1))
        squared_norm = squared_mean - inverse_sizes / w**2 * trace
        self._last = (trace, squared_norm)
        beta = self.decay
        previous = self._averages or (0.0, 0.0)
        self._averages = tuple(beta * m + (1 - beta) * x for m, x in zip(previous, self._last))
        self._steps += 1

    # ------------------------------------------------------------------ results

    @property
    def steps(self) -> int:
        """Backward passes seen (all-reduces of the whole gradient)."""
        self._settle()
        return self._steps

    @property
    def last_parts(self) -> tuple[float, float]:
        r"""The last step's unbiased ``(S, |G|^2)``, not smoothed (``nan`` before a step)."""
        self._settle()
        return self._last if self._last is not None else (math.nan, math.nan)

    @property
    def parts(self) -> tuple[float, float]:
        r"""The moving averages of ``(S, |G|^2)``, debiased (``nan`` before a step)."""
        self._settle()
        if self._averages is None:
            return math.nan, math.nan
        trace, squared_norm = (m / (1 - self.decay**self._steps) for m in self._averages)
        return trace, squared_norm

    @property
    def noise_scale(self) -> float:
        r"""The noise scale :math:`\mathcal B = S / |G|^2` of the averages, in examples.

        ``nan`` before the first step; negative or huge while the average of :math:`|G|^2` is
        still dominated by noise (average over more steps, or a larger ``decay``).
        """
        trace, squared_norm = self.parts
        return trace / squared_norm if squared_norm != 0 else math.inf


def _average(buffer: Tensor, world_size: int, out: Tensor) -> Tensor:
    """``buffer / world_size`` written into ``out``: the rank average after a summing all-reduce.

    For a power of two the reciprocal is exact, so multiplying gives DDP's quotient bit for bit
    in about 60% of a division's time (measured on a float32 bucket of 85,000 entries).
    """
    if world_size & (world_size - 1) == 0:
        return torch.mul(buffer, 1.0 / world_size, out=out)
    return torch.div(buffer, world_size, out=out)


def _squared_norm(t: Tensor) -> float:
    """The squared norm of a flat tensor, as a Python float.

    One dot product in the tensor's dtype (half precision widened to float32): the BLAS dot's
    vectorized accumulation, about 3e-8 relative for a float32 bucket of 85,000 entries
    (measured against a float64 sum), below the gradient entries' own rounding. Converting the
    bucket to float64 first allocates twice its size at every step, in the process group's
    thread: that was most of the hook's cost, measured.
    """
    wide = t if t.element_size() >= 4 else t.float()
    return float(torch.dot(wide, wide))
