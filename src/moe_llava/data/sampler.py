"""Batch sampler that never mixes image and text-only samples in one batch.

The reference's "group by modality length": image samples and text-only samples are batched
separately (a batch is all-image or all-text), and inside a *megabatch* (``megabatch_batches``
consecutive batches of one modality) samples are sorted by length so that padding is small. Batch
order is then shuffled across modalities. Deterministic for a given ``seed`` and epoch
(:meth:`set_epoch`), and shardable across ranks (``num_replicas``/``rank``) without Lightning's
distributed sampler, which cannot wrap a batch sampler. :meth:`resume` continues an interrupted
epoch: the same batch order, minus the batches already trained on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class ModalityGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; every batch holds a single modality.

    Args:
        has_image: per sample, whether it has an image (``LlavaDataset.has_image``).
        lengths: per sample, an approximate length for length grouping (``LlavaDataset.lengths``);
            None disables length grouping.
        batch_size: samples per batch (per rank).
        shuffle: shuffle samples and batch order (each epoch differently, see ``set_epoch``).
        seed: base seed.
        drop_last: drop each modality's last incomplete batch.
        megabatch_batches: batches per megabatch for length sorting.
        num_replicas, rank: shard the batches across data-parallel ranks (every rank gets the same
            number of batches; the shortest shards repeat a batch from the start).
    """

    def __init__(
        self,
        has_image: Sequence[bool],
        lengths: Sequence[int] | None,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        megabatch_batches: int = 8,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lengths is not None and len(lengths) != len(has_image):
            raise ValueError("lengths and has_image must have the same length")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.has_image = [bool(x) for x in has_image]
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.megabatch_batches = max(1, megabatch_batches)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> ModalityGroupedBatchSampler:
        # Lightning sets each epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler``, never
        # on the batch sampler itself: without this, every epoch would repeat epoch 0's order.
        return self

    def resume(self, epoch: int, batches_done: int) -> None:
        """The next iteration yields epoch ``epoch``'s batches (of this rank) after the first
        ``batches_done``; later iterations are whole epochs again. ``len`` stays the whole epoch's."""
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done must be in [0, {len(self)}], got {batches_done}")
        self.epoch, self._skip = epoch, batches_done

    def _group_batches(self, indices: list[int], rng: random.Random) -> list[list[int]]:
        if self.shuffle:
            rng.shuffle(indices)
        batches: list[list[int]] = []
        mega = self.batch_size * self.megabatch_batches
        for start in range(0, len(indices), mega):
            chunk = indices[start : start + mega]
            if self.lengths is not None:
                chunk.sort(key=lambda i: -self.lengths[i])  # type: ignore[index]
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        image = [i for i, h in enumerate(self.has_image) if h]
        text = [i for i, h in enumerate(self.has_image) if not h]
        batches = self._group_batches(image, rng) + self._group_batches(text, rng)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if self.num_replicas > 1:
            per_rank = math.ceil(len(batches) / self.num_replicas)
            padded = list(batches)
            while batches and len(padded) < per_rank * self.num_replicas:
                padded += batches[: per_rank * self.num_replicas - len(padded)]
            batches = padded[self.rank :: self.num_replicas]
        skip, self._skip = self._skip, 0
        yield from batches[skip:]

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        n_image = sum(self.has_image)
        total = self._num_batches(n_image) + self._num_batches(len(self.has_image) - n_image)
        return math.ceil(total / self.num_replicas)
