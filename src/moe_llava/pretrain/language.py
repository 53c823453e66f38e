"""Causal-LM pretraining of the language model on the training text (no images).

Every training conversation (captions and instructions, ``<image>`` placeholders removed) is
rendered with the stage's chat template, so the LM learns the vocabulary and the answer formats;
the loss is next-token prediction on every token (``transformers``' own loss, ``labels=input_ids``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.manifest import iter_entries
from moe_llava.data.templates import TemplateError, get_template
from moe_llava.errors import UserError


def text_samples(path: Path, template: str, tokenizer, max_length: int) -> list[torch.Tensor]:
    """Token ids of every conversation of a manifest, rendered without its images."""
    samples = []
    for entry in iter_entries(path):
        record = entry.record
        where = f"{path}:{entry.line} (record {entry.index})"
        if entry.error is not None:
            raise UserError(f"{where}: {entry.error}")
        conversations = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(conversations, list):
            raise UserError(f"{where}: field 'conversations' must be a list of turns")
        turns = [
            {**turn, "value": str(turn.get("value", "")).replace(IMAGE_TOKEN, "").strip()}
            for turn in conversations
            if isinstance(turn, dict)
        ]
        try:
            ids = get_template(template).encode(turns, tokenizer).input_ids
        except TemplateError as err:
            raise UserError(f"{where}: {err}") from None
        samples.append(torch.tensor(ids[:max_length]))
    if not samples:
        raise UserError(f"{path}: no conversations")
    return samples


def loader(samples: list[torch.Tensor], pad_id: int, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Seeded random batches (length-grouped ones pad less, but their LM trained a worse stage 2:
    docs/experiments.md)."""

    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": input_ids.masked_fill(mask == 0, -100),
        }

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        samples, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )
