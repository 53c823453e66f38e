"""How well can a vision tower learn a dataset's POPE objects when told the answers directly?

A diagnostic for the learning-quality bar: the model's vision tower (built from its config, random
weights, exactly as stage 1 gets it) plus a small attention head (one learned query per object,
cross-attending to the tower's patch features, a logit per object) is trained on the training
images' object annotations with a plain multi-label loss, then scored as POPE scores a model:
for each (test image, object, yes/no) question of the POPE files, the answer is "yes" when the
object's logit passes a threshold. Two thresholds are reported:

* ``val``: the one with the best balanced F1 on the validation images (a fair number);
* ``oracle``: the best one per split on the test questions themselves (an upper bound).

No language model is involved, so this is the easiest supervision the tower can get; the
generative pipeline, which must learn the same facts through next-token prediction with a
from-scratch LM, should not be expected to beat it in the same time.
``moe-llava eval vision-probe --data-root data/shapesworld`` runs it (see docs/evaluation.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from moe_llava.data.images import ImageTransform, open_image, resolve_image_path
from moe_llava.errors import UserError
from moe_llava.evaluation.pope import POPE_SPLITS
from moe_llava.model.builder import build_image_processor, build_vision_tower
from moe_llava.pretrain.vision import ObjectHead


@dataclass
class ProbeConfig:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    feature_layer: int = -2  # the layer the VLM's projector reads
    time_budget_s: float | None = None  # stop after the epoch that crosses it
    seed: int = 0
    # A pretrained tower (a save_pretrained folder), kept frozen: the probe then measures what its
    # features hold, as a VLM with a frozen tower reads them. None: the recipe's tower, random init.
    pretrained_tower: str | None = None


@dataclass
class ProbeResult:
    config: dict
    vision_tower: dict
    objects: list[str]
    trainable_parameters: int = 0
    epochs: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The records of a JSONL file; a bad line or a missing key is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            missing = [key for key in keys if key not in record] if isinstance(record, dict) else list(keys)
            if missing:
                raise UserError(f"{path}:{line_number}: record lacks field(s) {missing}")
            records.append(record)
    return records


def _load_split(
    root: Path, split: str, transform: ImageTransform
) -> tuple[list[str], torch.Tensor, list[list[str]]]:
    path = root / f"annotations_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the probe needs ShapesWorld-style object annotations")
    records = _read_jsonl(path, ("image", "objects"))
    images = [open_image(resolve_image_path(root / "images", record["image"])) for record in records]
    pixels = torch.cat([transform(images[i : i + 256]) for i in range(0, len(images), 256)])
    objects = [[obj["name"] for obj in record["objects"]] for record in records]
    return [record["image"] for record in records], pixels, objects


def _f1(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def _best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    candidates = scores.unique()
    if candidates.numel() > 512:
        candidates = candidates.quantile(torch.linspace(0, 1, 512, dtype=candidates.dtype))
    best = max(((_f1(scores, labels, float(t)), float(t)) for t in candidates), default=(0.0, 0.0))
    return best[1], best[0]


def run_probe(
    data_root: str | Path,
    vision_tower: Mapping,
    config: ProbeConfig | None = None,
    log: Callable[[str], None] = print,
) -> ProbeResult:
    """Train the probe on ``data_root``'s training images, score it on its POPE files after every epoch."""
    cfg = config or ProbeConfig()
    torch.manual_seed(cfg.seed)
    tower, transform = _build_tower(vision_tower, cfg)
    data = _load_probe_data(Path(data_root), transform)
    probe = _Probe(tower, ObjectHead(tower.config.hidden_size, len(data.objects)), cfg)
    optimizer = torch.optim.AdamW(probe.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(len(data.train_pixels) // cfg.batch_size, 1)
    total = cfg.epochs * steps_per_epoch
    schedule = get_cosine_schedule_with_warmup(optimizer, max(int(total * cfg.warmup_ratio), 1), total)
    result = ProbeResult(
        config=asdict(cfg),
        vision_tower=json.loads(tower.config.to_json_string()),
        objects=data.objects,
        trainable_parameters=sum(p.numel() for p in probe.params),
    )
    start = time.perf_counter()
    probe.train()
    for epoch in range(cfg.epochs):
        train_loss = _train_epoch(probe, data, optimizer, schedule, steps_per_epoch, cfg.batch_size)
        scores = _score_pope(probe, data, _val_threshold(probe, data, cfg.seed))
        seconds = round(time.perf_counter() - start, 1)
        row = {"epoch": epoch + 1, "seconds": seconds, "train_loss": train_loss, **scores}
        result.epochs.append(row)
        log(_epoch_line(row))
        if cfg.time_budget_s is not None and row["seconds"] >= cfg.time_budget_s:
            log(f"time budget of {cfg.time_budget_s:.0f}s reached after epoch {row['epoch']}")
            break
    return result


def _build_tower(vision_tower: Mapping, cfg: ProbeConfig) -> tuple[nn.Module, ImageTransform]:
    """The recipe's tower with random weights (trained), or ``cfg.pretrained_tower`` (frozen); its transform."""
    frozen = cfg.pretrained_tower is not None
    if frozen:
        spec = {"name_or_path": str(cfg.pretrained_tower)}
    else:
        spec = {**dict(vision_tower), "name_or_path": None}  # random weights, as the tiny recipe
    tower = build_vision_tower(spec, pretrained=frozen)
    tower.requires_grad_(not frozen)
    return tower, ImageTransform(build_image_processor(spec, pretrained=frozen), aspect="pad")


@dataclass
class _ProbeData:
    objects: list[str]  # every object name of the annotations and the questions: the head's outputs
    train_pixels: torch.Tensor
    train_targets: torch.Tensor  # multi-hot, one row per image
    val_pixels: torch.Tensor
    val_targets: torch.Tensor
    test_pixels: torch.Tensor
    pope: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # split -> (test row, object, label)


def _load_probe_data(root: Path, transform: ImageTransform) -> _ProbeData:
    """The annotated train/val/test images and the POPE questions, as tensors over one object list."""
    _, train_pixels, train_objects = _load_split(root, "train", transform)
    _, val_pixels, val_objects = _load_split(root, "val", transform)
    test_ids, test_pixels, test_objects = _load_split(root, "test", transform)
    questions = {
        split: _read_jsonl(root / f"pope_{split}.jsonl", ("question_id", "image", "object", "label"))
        for split in POPE_SPLITS
    }
    objects = sorted(
        {name for names in (*train_objects, *val_objects, *test_objects) for name in names}
        | {q["object"] for split_questions in questions.values() for q in split_questions}
    )
    index = {name: i for i, name in enumerate(objects)}

    def multi_hot(names_per_image):
        target = torch.zeros(len(names_per_image), len(objects))
        for row, names in enumerate(names_per_image):
            target[row, [index[n] for n in names]] = 1.0
        return target

    test_row = {image: row for row, image in enumerate(test_ids)}
    pope = {}
    for split, split_questions in questions.items():
        unknown = [q["question_id"] for q in split_questions if q["image"] not in test_row]
        if unknown:
            raise UserError(
                f"{root / f'pope_{split}.jsonl'}: questions {unknown[:5]} ask about images missing from "
                f"{root / 'annotations_test.jsonl'}"
            )
        pope[split] = (
            torch.tensor([test_row[q["image"]] for q in split_questions]),
            torch.tensor([index[q["object"]] for q in split_questions]),
            torch.tensor([q["label"] == "yes" for q in split_questions]),
        )
    return _ProbeData(
        objects, train_pixels, multi_hot(train_objects), val_pixels, multi_hot(val_objects), test_pixels, pope
    )


class _Probe:
    """The tower and the object head: a logit per (image, object)."""

    def __init__(self, tower: nn.Module, head: nn.Module, cfg: ProbeConfig) -> None:
        self.tower, self.head, self.feature_layer = tower, head, cfg.feature_layer
        self.frozen = cfg.pretrained_tower is not None
        self.params = [p for p in (*tower.parameters(), *head.parameters()) if p.requires_grad]

    def train(self) -> None:
        self.tower.train(not self.frozen), self.head.train()

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]
        return self.head(hidden[:, 1:] if hidden.shape[1] > 1 else hidden)  # CLS dropped, as the VLM does

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        self.tower.eval(), self.head.eval()
        out = torch.cat([self.logits(pixels[i : i + 128]) for i in range(0, len(pixels), 128)])
        self.train()
        return out


def _train_epoch(probe: _Probe, data: _ProbeData, optimizer, schedule, steps: int, batch_size: int) -> float:
    """One pass over the training images in a random order; the mean multi-label loss."""
    order = torch.randperm(len(data.train_pixels))
    losses = []
    for step in range(steps):
        batch = order[step * batch_size : (step + 1) * batch_size]
        loss = nn.functional.binary_cross_entropy_with_logits(
            probe.logits(data.train_pixels[batch]), data.train_targets[batch]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def _val_threshold(probe: _Probe, data: _ProbeData, seed: int) -> float:
    """The threshold with the best F1 on the validation images: every present object + as many absent ones."""
    val_scores = probe.predict(data.val_pixels)
    generator = torch.Generator().manual_seed(seed)
    positives = data.val_targets.bool()
    negative_pick = torch.rand(val_scores.shape, generator=generator) < (positives.sum() / (~positives).sum())
    chosen = positives | negative_pick
    return _best_threshold(val_scores[chosen], positives[chosen])[0]


def _score_pope(probe: _Probe, data: _ProbeData, threshold: float) -> dict[str, float]:
    """F1 per POPE split at ``threshold`` and at the split's own best (oracle) threshold, and their means."""
    test_scores = probe.predict(data.test_pixels)
    row = {}
    for split, (image_rows, object_cols, labels) in data.pope.items():
        scores = test_scores[image_rows, object_cols]
        row[f"{split}/f1"] = _f1(scores, labels, threshold)
        row[f"{split}/f1_oracle"] = _best_threshold(scores, labels)[1]
    row["mean_f1"] = sum(row[f"{s}/f1"] for s in POPE_SPLITS) / len(POPE_SPLITS)
    row["mean_f1_oracle"] = sum(row[f"{s}/f1_oracle"] for s in POPE_SPLITS) / len(POPE_SPLITS)
    return row


def _epoch_line(row: Mapping) -> str:
    return (
        f"epoch {row['epoch']}  {row['seconds']:.0f}s  train loss {row['train_loss']:.4f}  "
        f"POPE F1 "
        + " / ".join(f"{row[f'{s}/f1']:.3f}" for s in POPE_SPLITS)
        + f"  mean {row['mean_f1']:.3f} (oracle threshold {row['mean_f1_oracle']:.3f})"
    )
