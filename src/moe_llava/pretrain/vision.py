"""Supervised pretraining of the vision tower: multi-label object recognition on the training images.

ImageNet-style pretraining (a classification head on the tower, binary cross-entropy per label)
with an attention-pooling head: one learned query per object cross-attends to the patch features
of the layer the VLM's projector reads (``vision_feature_layer``), so those features learn where
each object is. (``transformers``' ``CLIPForImageClassification``, which mean-pools the last
layer, was measured too: a weaker tower for the VLM in the same time, see docs/experiments.md.)
Only the tower is kept (``save_pretrained``), with its image processor; the head is thrown away,
as an ImageNet classifier is when its backbone becomes a VLM's vision tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from moe_llava.data.images import ImageIssue, ImageTransform, open_image, resolve_image_path
from moe_llava.data.manifest import iter_entries
from moe_llava.errors import UserError
from moe_llava.model.builder import build_image_processor, build_vision_tower


def read_annotations(path: Path, image_folder: Path) -> tuple[list[Path], list[list[str]]]:
    """Image paths and object names of an annotation file; a bad record names file, line and field."""
    paths, names = [], []
    for entry in iter_entries(path):
        record = entry.record
        where = f"{path}:{entry.line} (record {entry.index})"
        if entry.error is not None:
            raise UserError(f"{where}: {entry.error}")
        if not isinstance(record, dict) or "image" not in record or "objects" not in record:
            raise UserError(f"{where}: an annotation needs fields 'image' and 'objects'")
        try:
            paths.append(resolve_image_path(image_folder, record["image"]))
            names.append([str(obj["name"]) for obj in record["objects"]])
        except (KeyError, TypeError):
            raise UserError(f"{where}: field 'objects' must be a list of objects with a 'name'") from None
        except ImageIssue as err:
            raise UserError(f"{where}: field 'image': {err}") from None
    if not paths:
        raise UserError(f"{path}: no annotations")
    return paths, names


def load_images(paths: list[Path], transform: ImageTransform, batch: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(paths), batch):
        images = []
        for path in paths[start : start + batch]:
            try:
                images.append(open_image(path))
            except ImageIssue as err:
                raise UserError(f"{path}: {err}") from None
        out.append(transform(images))
    return torch.cat(out)


def multi_hot(names: list[list[str]], labels: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(labels)}
    target = torch.zeros(len(names), len(labels))
    for row, objects in enumerate(names):
        target[row, [index[n] for n in objects if n in index]] = 1.0
    return target


class VisionData:
    """The tensors of the vision pretraining: train/val pixels and multi-hot object targets."""

    def __init__(self, tower: Mapping, root: Path, image_folder: Path, train: str, val: str | None):
        spec = {**dict(tower), "name_or_path": None}
        self.transform = ImageTransform(build_image_processor(spec, pretrained=False), aspect="pad")
        train_paths, train_names = read_annotations(root / train, image_folder)
        self.labels = sorted({name for objects in train_names for name in objects})
        self.train = TensorDataset(
            load_images(train_paths, self.transform), multi_hot(train_names, self.labels)
        )
        self.val = None
        if val:
            val_paths, val_names = read_annotations(root / val, image_folder)
            self.val = TensorDataset(
                load_images(val_paths, self.transform), multi_hot(val_names, self.labels)
            )

    def loader(self, split: str, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        dataset = self.train if split == "train" else self.val
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=_collate
        )


def _collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    pixels, labels = zip(*rows, strict=True)
    return {"pixel_values": torch.stack(pixels), "labels": torch.stack(labels)}


class ObjectHead(nn.Module):
    """One learned query per object cross-attends to the patch features; a logit per object."""

    def __init__(self, hidden_size: int, num_objects: int, num_heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_objects, hidden_size) * 0.02)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(features.shape[0], -1, -1)
        pooled, _ = self.attention(queries, features, features)
        return self.out(pooled).squeeze(-1)


class ObjectRecognizer(nn.Module):
    """A vision tower and an :class:`ObjectHead` on the patch features of ``feature_layer``."""

    def __init__(self, tower: PreTrainedModel, labels: list[str], feature_layer: int = -2):
        super().__init__()
        self.tower = tower
        self.labels = list(labels)
        self.feature_layer = feature_layer
        self.head = ObjectHead(tower.config.hidden_size, len(labels))

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
            self.feature_layer
        ]
        logits = self.head(hidden[:, 1:] if hidden.shape[1] > 1 else hidden)  # CLS dropped, as the VLM does
        loss = None if labels is None else nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def recognizer_for(tower: Mapping, labels: list[str], feature_layer: int = -2) -> ObjectRecognizer:
    """The recipe's tower, randomly initialised from its config values, with a fresh object head."""
    return ObjectRecognizer(
        build_vision_tower({**dict(tower), "name_or_path": None}, pretrained=False), labels, feature_layer
    )


@torch.no_grad()
def presence_f1(model: ObjectRecognizer, loader: DataLoader) -> dict[str, Any]:
    """Micro F1 of "object present" (logit > 0) over every (image, object) pair of ``loader``."""
    model.eval()
    tp = fp = fn = 0
    for batch in loader:
        predicted = model(pixel_values=batch["pixel_values"]).logits > 0
        truth = batch["labels"].bool()
        tp += int((predicted & truth).sum())
        fp += int((predicted & ~truth).sum())
        fn += int((~predicted & truth).sum())
    model.train()
    return {"val/presence_f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def save_tower(model: ObjectRecognizer, image_processor, out_dir: Path) -> None:
    model.tower.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
