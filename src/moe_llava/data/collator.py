"""Batch collation: padding, attention mask, and the image/text modality mask.

Output (the model's batch contract)::

    input_ids      LongTensor (B, T)   padded with the tokenizer's pad id
    attention_mask LongTensor (B, T)   1 on real tokens, 0 on padding
    labels         LongTensor (B, T)   IGNORE_INDEX (-100) except assistant answers (+ end of turn)
    pixel_values   FloatTensor (N_images, 3, H, W) in order of appearance, or None without images
    image_mask     BoolTensor (B, T)   True at image-token positions (what the MoE statistics split on)

``padding_side="right"`` for training, ``"left"`` for batched generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moe_llava.constants import IGNORE_INDEX
from moe_llava.data.templates import image_token_id_of

PADDING_SIDES = ("right", "left")


class LlavaCollator:
    """Collate :class:`~moe_llava.data.dataset.LlavaDataset` items into a model batch.

    Args:
        pad_token_id: id used for padding ``input_ids``.
        image_token_id: id of ``<image>``; positions holding it form ``image_mask``.
        num_image_tokens: if given, checks that every image contributes exactly that many tokens.
        padding_side: ``right`` or ``left``.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        return_ids: also return ``ids`` (record ids) and, when present, ``answers`` (list of str):
            evaluation pairs generations with labels by id, never by order.
    """

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int,
        *,
        num_image_tokens: int | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        return_ids: bool = False,
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer needs a pad token (set tokenizer.pad_token)"
            )
        self.pad_token_id = int(pad_token_id)
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = num_image_tokens
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_ids = return_ids

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> LlavaCollator:
        pad = tokenizer.pad_token_id
        if pad is None:  # common for decoder-only LMs: pad with EOS (masked out anyway)
            pad = tokenizer.eos_token_id
        return cls(pad, image_token_id_of(tokenizer), **kwargs)

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        image_mask = torch.zeros((batch, width), dtype=torch.bool)
        pixel_values = []
        for row, (feature, length) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            lab = torch.as_tensor(feature["labels"], dtype=torch.long)
            span = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
            input_ids[row, span] = ids
            labels[row, span] = lab
            attention_mask[row, span] = 1
            is_image = ids == self.image_token_id
            image_mask[row, span] = is_image
            pv = feature.get("pixel_values")
            n_images = 0 if pv is None else int(pv.shape[0])
            if self.num_image_tokens is not None and int(is_image.sum()) != n_images * self.num_image_tokens:
                raise ValueError(
                    f"sample {feature.get('id')!r}: {int(is_image.sum())} image tokens for {n_images} image(s) "
                    f"x {self.num_image_tokens} tokens"
                )
            if pv is not None:
                pixel_values.append(pv)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pixel_values, dim=0) if pixel_values else None,
            "image_mask": image_mask,
        }
        if self.return_ids:
            out["ids"] = [f.get("id") for f in features]
            if any("answer" in f for f in features):
                out["answers"] = [f.get("answer") for f in features]
        return out
