r"""Batches of the size an optimizer asks for: the sampler that follows CABS, also across ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from goodfellow._checks import is_integer, is_real
from goodfellow.cabs import CABS

__all__ = ["AdaptiveBatchSampler", "adaptive_batches"]


BatchSizeSource = int | Callable[[], int] | CABS


def _check_batch_size_source(source: object) -> None:
    if isinstance(source, bool) or not (
        is_integer(source) or hasattr(source, "batch_size") or callable(source)
    ):
        raise TypeError(
            "batch_size must be an int, a callable returning one, or an object with a "
            f".batch_size attribute (like CABS), got {type(source).__name__}."
        )
    if is_integer(source):
        _read_batch_size(source)


def _read_batch_size(source: BatchSizeSource) -> int:
    if is_integer(source):
        size = source
    elif hasattr(source, "batch_size"):
        size = source.batch_size
    else:
        size = source()
    if not is_integer(size) or size < 1:
        raise ValueError(f"the batch size must be a positive integer, got {size!r}.")
    return int(size)


class AdaptiveBatchSampler(torch.utils.data.Sampler):
    """Index batches whose size is asked anew for every batch, e.g. from :class:`goodfellow.CABS`.

    The examples are visited in passes, each a fresh random permutation. A batch takes the next
    ``b`` indices; when the pass runs out mid-batch, the batch is completed from the next pass
    with examples it does not already hold (those are moved, not dropped), so every batch has
    exactly ``b`` distinct examples and every pass visits every example once. A batch cannot
    hold more distinct examples than the data set: ``b`` is capped at ``num_examples``.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` with ``num_workers=0`` (workers
    would fetch batches before the optimizer has chosen their size), or through
    :func:`adaptive_batches`. ``len(sampler)`` (and so ``len(loader)``) is the number of
    batches one iteration yields at the **current** batch size (read once, when ``len`` is
    called): exact for a fixed ``int``, an estimate for an adaptive source such as
    :class:`goodfellow.CABS`,
    whose size changes while the batches are drawn; without ``epochs`` there is no length.

    Args:
        num_examples: The size of the data set.
        batch_size: An ``int`` (a fixed batch size: the same sampling for a baseline), a
            callable returning the next size, or an object with a ``batch_size`` attribute such
            as :class:`goodfellow.CABS`; read each time a batch is drawn.
        epochs: Stop once ``epochs * num_examples`` examples were drawn (the last batch is
            complete, so slightly more may be); ``None`` never stops.
        generator: The random generator for the permutations.
        num_replicas: For data-parallel training, the number of ranks ``W``: every rank then
            yields its share ``batch[rank::W]`` of each global batch, the shares are disjoint
            and together are the global batch, and ``batch_size`` is the global size (so it
            must give the same sizes on every rank, as ``CABS(group=...)`` does). Pass a
            ``generator`` seeded alike on every rank so that all draw the same permutations.
            ``None``: one process, the whole batch.
        rank: This rank, ``0 <= rank < num_replicas``; given with ``num_replicas``.

    Attributes:
        examples_seen: How many examples the global batches drawn so far held.

    Raises:
        ValueError: If ``num_replicas`` and ``rank`` are not given together, are out of range,
            or come without a ``generator``.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: BatchSizeSource,
        epochs: float | None = None,
        generator: torch.Generator | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if (num_replicas is None) != (rank is None):
            raise ValueError(
                "num_replicas and rank go together: pass both (e.g. num_replicas="
                "dist.get_world_size(), rank=dist.get_rank()) or neither."
            )
        if num_replicas is not None:
            if not is_integer(num_replicas) or num_replicas < 1:
                raise ValueError(
                    f"num_replicas must be a positive integer, got {num_replicas!r}."
                )
            if not is_integer(rank) or not 0 <= rank < num_replicas:
                raise ValueError(
                    f"rank must be an integer in [0, num_replicas = {num_replicas}), "
                    f"got {rank!r}."
                )
            if generator is None:
                raise ValueError(
                    "with num_replicas, pass a generator seeded alike on every rank (e.g. "
                    "torch.Generator().manual_seed(0)): the global random state differs "
                    "between ranks, and so would the batches."
                )
        self.num_replicas = 1 if num_replicas is None else int(num_replicas)
        self.rank = 0 if rank is None else int(rank)
        if not is_integer(num_examples) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
        if epochs is not None and (not is_real(epochs) or not math.isfinite(epochs) or epochs <= 0):
            raise ValueError(f"epochs must be a positive number or None, got {epochs!r}.")
        _check_batch_size_source(batch_size)
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size) if is_integer(batch_size) else batch_size
        self.epochs = epochs if epochs is None else float(epochs)
        self.generator = generator
        self.examples_seen = 0

    def __len__(self) -> int:
        r"""The number of batches one iteration yields at the current batch size.

        The batch size is read once, now (a callable source is called); an adaptive source
        such as :class:`goodfellow.CABS` changes it while the batches are drawn, so the actual
        number of
        batches differs: this is an estimate for progress bars and schedulers, exact for a
        fixed ``int``. With ``epochs=1`` it is the number of batches of one epoch,
        :math:`\lceil N / b \rceil` for ``N`` examples and batch size ``b``; in general the
        smallest ``k`` with :math:`k b \ge` ``epochs * N``.

        Raises:
            TypeError: If ``epochs`` is ``None``: the batches never stop, so there is no
                length.
        """
        if self.epochs is None:
            raise TypeError(
                "AdaptiveBatchSampler(epochs=None) draws batches without end, so it has no "
                "length; pass epochs=... to stop after that many passes over the data."
            )
        size = min(_read_batch_size(self.batch_size), self.num_examples)
        budget = self.epochs * self.num_examples
        count = math.ceil(budget / size)
        # the same comparisons as __iter__'s loop, so that rounding cannot make them disagree
        while count > 0 and (count - 1) * size >= budget:
            count -= 1
        while count * size < budget:
            count += 1
        return count

    def __iter__(self) -> Iterator[list[int]]:
        """Yield lists of indices until ``epochs`` passes were drawn."""
        self.examples_seen = 0
        budget = math.inf if self.epochs is None else self.epochs * self.num_examples
        pending: list[int] = []  # what is left of the current pass, in order
        while self.examples_seen < budget:
            size = min(_read_batch_size(self.batch_size), self.num_examples)
            if len(pending) >= size:
                batch, pending = pending[:size], pending[size:]
            else:
                batch = pending
                taken = set(batch)
                fresh = torch.randperm(self.num_examples, generator=self.generator).tolist()
                # Complete the batch from the next pass, deferring what it already holds.
                fill = [i for i in fresh if i not in taken][: size - len(batch)]
                filled = set(fill)
                batch = batch + fill
                pending = [i for i in fresh if i not in filled]
            self.examples_seen += len(batch)
            yield batch[self.rank :: self.num_replicas]


def adaptive_batches(
    dataset: torch.utils.data.TensorDataset | Sequence[Tensor],
    batch_size: BatchSizeSource,
    epochs: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Batches of a tensor data set in the sizes an optimizer asks for.

    The batches are drawn as by :class:`AdaptiveBatchSampler`, indexing the tensors directly
    (faster than a ``DataLoader`` for data in memory).

    Args:
        dataset: A ``TensorDataset`` or a tuple of tensors with the same first dimension.
        batch_size: An ``int``, a callable, or an object with ``batch_size`` such as
            :class:`goodfellow.CABS`; read before every batch.
        epochs: Stop after about this many passes over the data; ``None`` never stops.
        generator: The random generator for the permutations.

    Yields:
        Tuples with one tensor per data tensor, each of shape ``(b, ...)``.
    """
    if isinstance(dataset, torch.utils.data.TensorDataset):
        tensors = list(dataset.tensors)
    elif isinstance(dataset, (list, tuple)) and all(isinstance(t, Tensor) for t in dataset):
        tensors = list(dataset)
    else:
        raise TypeError(
            f"dataset must be a TensorDataset or a tuple of tensors, got {type(dataset).__name__}."
        )
    if not tensors:
        raise ValueError("dataset holds no tensors.")
    n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise ValueError("the data tensors must share their first (example) dimension.")
    sampler = AdaptiveBatchSampler(n, batch_size, epochs, generator)
    for indices in sampler:
        index = torch.tensor(indices, device=tensors[0].device)
        yield tuple(t[index] for t in tensors)
