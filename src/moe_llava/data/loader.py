"""DataLoader assembly: dataset + modality-grouped batch sampler + collator."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from moe_llava.data.collator import LlavaCollator
from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.sampler import ModalityGroupedBatchSampler


def build_collator(dataset: LlavaDataset, *, padding_side: str = "right", **kwargs: Any) -> LlavaCollator:
    """A collator matching the dataset's tokenizer and ``num_image_tokens``."""
    return LlavaCollator.from_tokenizer(
        dataset.tokenizer, num_image_tokens=dataset.num_image_tokens, padding_side=padding_side, **kwargs
    )


def build_dataloader(
    dataset: LlavaDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    group_by_modality: bool = True,
    group_by_length: bool = True,
    drop_last: bool = False,
    padding_side: str = "right",
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pad_to_multiple_of: int | None = None,
    return_ids: bool = False,
) -> DataLoader:
    """Training (``shuffle=True``) or evaluation (``shuffle=False``, ``padding_side="left"``) loader.

    With ``group_by_modality`` batches come from :class:`ModalityGroupedBatchSampler` (Lightning
    sets its epoch; elsewhere call ``loader.batch_sampler.set_epoch(epoch)`` each epoch); otherwise
    a plain sequential or shuffled sampler is used (no sharding: pass ``num_replicas=1``).
    """
    collator = build_collator(
        dataset, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of, return_ids=return_ids
    )
    if group_by_modality:
        sampler = ModalityGroupedBatchSampler(
            dataset.has_image,
            dataset.lengths if group_by_length else None,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            num_replicas=num_replicas,
            rank=rank,
        )
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
    if num_replicas != 1:
        raise ValueError("sharding (num_replicas > 1) needs group_by_modality=True or a DistributedSampler")
    import torch

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collator,
        num_workers=num_workers,
        generator=generator if shuffle else None,
    )
