"""Generate the ShapesWorld corpus: images, LLaVA manifests, VQA, POPE, tokenizer. Byte-deterministic.

Layout of ``out_dir`` (all manifests in the LLaVA format, image paths relative to ``images/``)::

    images/{train,val,test}/NNNNNN.png     8-bit palette PNGs
    annotations_{train,val,test}.jsonl     ground truth: objects (colour, shape, bbox, position, visibility)
    captions_{train,val}.json              stage 1 (template `plain`)
    instruct_{train,val}.json              stages 2/3 (chat template), incl. text-only samples
    vqa_{val,test}.jsonl                   short-answer VQA (question_id, image, text, answer, conversations)
    pope_{random,popular,adversarial}.jsonl   POPE on the test images (balanced yes/no)
    stats.json                             object frequencies and co-occurrences (train split)
    tokenizer/                             byte-level BPE (transformers fast tokenizer)
    config.json, README.md

Every random choice comes from a ``random.Random`` seeded by a string naming the seed, the split and
the item, so the output depends only on the config (and the Pillow/tokenizers builds): generating
twice gives identical bytes, which is what lets a fresh clone regenerate ``data/`` to the md5s
recorded in ``data.dvc``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.manifest import write_manifest
from moe_llava.data.shapesworld.pope import POPE_SPLITS, ObjectStats, pope_questions
from moe_llava.data.shapesworld.scene import ObjectPrior, SceneSpec, render_scene, sample_scene
from moe_llava.data.shapesworld.text import (
    SHORT_ANSWER_SUFFIX,
    SceneText,
    caption_conversation,
    instruction_conversation,
    polling_conversation,
    text_only_conversation,
    vqa_question,
)
from moe_llava.data.templates import DEFAULT_SYSTEM

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class ShapesWorldConfig:
    """Size and difficulty of the corpus (defaults = the project's embedded default dataset)."""

    seed: int = 0
    image_size: int = 64
    train_images: int = 3000
    val_images: int = 200
    test_images: int = 300
    # scenes
    min_objects: int = 1
    max_objects: int = 4
    object_count_weights: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.3, 0.2])
    min_object_frac: float = 0.2  # object diameter as a fraction of the image side
    max_object_frac: float = 0.42
    occlusion_prob: float = 0.25  # share of scenes whose objects may overlap
    min_visible: float = 0.55  # every object keeps at least this fraction of its pixels
    max_clutter: int = 5  # grey lines and dots in the background
    max_angle: float = 15.0
    duplicate_prob: float = 0.05  # the same object twice in a scene
    # co-occurrence statistics
    zipf_exponent: float = 1.0
    companions_per_object: int = 2
    companion_boost: float = 8.0
    # text
    instruct_per_image: int = 2
    multi_turn_prob: float = 0.3
    max_turns: int = 3
    short_answer_prob: float = 0.5
    text_only_fraction: float = 0.08
    hard_negative_prob: float = 0.5  # training "No" questions drawn like POPE popular/adversarial
    polling_per_image: int = 2  # extra conversations of short existence questions per image
    polling_turns: int = 6  # questions per polling conversation (half "Yes", half "No")
    vqa_per_image: int = 2
    pope_max_positives: int = 3
    # tokenizer
    tokenizer_vocab_size: int = 1024
    tokenizer_model_max_length: int = 2048

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> ShapesWorldConfig:
        """From None, a dataclass, a mapping or an OmegaConf node (``_target_`` keys are ignored)."""
        if config is None:
            values: dict[str, Any] = {}
        elif isinstance(config, cls):
            values = dataclasses.asdict(config)
        else:
            try:
                from omegaconf import DictConfig, OmegaConf

                if isinstance(config, DictConfig):
                    config = OmegaConf.to_container(config, resolve=True)
            except ImportError:  # pragma: no cover
                pass
            if not isinstance(config, Mapping):
                raise TypeError(f"cannot build a ShapesWorldConfig from {type(config).__name__}")
            values = {k: v for k, v in config.items() if not str(k).startswith("_")}
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ShapesWorld config key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        cfg.object_count_weights = [float(w) for w in cfg.object_count_weights]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError("need 1 <= min_objects <= max_objects <= 8")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        if min(self.train_images, self.val_images, self.test_images) < 1:
            raise ValueError("every split needs at least one image")
        if self.polling_per_image < 0 or self.polling_turns < 1:
            raise ValueError("need polling_per_image >= 0 and polling_turns >= 1")
        if not 0 < self.min_object_frac <= self.max_object_frac < 0.9:
            raise ValueError("need 0 < min_object_frac <= max_object_frac < 0.9")

    def scene_spec(self) -> SceneSpec:
        return SceneSpec(
            image_size=self.image_size,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            object_count_weights=tuple(self.object_count_weights),
            min_object_frac=self.min_object_frac,
            max_object_frac=self.max_object_frac,
            occlusion_prob=self.occlusion_prob,
            min_visible=self.min_visible,
            max_clutter=self.max_clutter,
            max_angle=self.max_angle,
            duplicate_prob=self.duplicate_prob,
        )

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_images, "val": self.val_images, "test": self.test_images}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


class _Negatives:
    """Absent objects for training existence questions: random, or hard (popular / co-occurring)."""

    def __init__(self, stats: ObjectStats, hard_prob: float) -> None:
        self.stats = stats
        self.hard_prob = hard_prob

    def __call__(self, rng: random.Random, present: set[str], k: int) -> list[str]:
        from moe_llava.data.shapesworld.vocab import all_objects

        absent = [o for o in all_objects() if o not in present]
        if rng.random() >= self.hard_prob:
            return rng.sample(absent, k)
        if rng.random() < 0.5:
            order = self.stats.popular_order(absent)
        else:
            order = self.stats.adversarial_order(sorted(present), absent)
        return rng.sample(order[: max(k, 5)], k)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5)


def generate_shapesworld(
    out_dir: str | Path, config: Any = None, *, progress: bool = False, overwrite: bool = True
) -> dict:
    """Generate the corpus into ``out_dir`` (replaced atomically); returns a summary dict.

    ``config``: a :class:`ShapesWorldConfig`, a mapping / OmegaConf node of its fields, or None for
    the defaults. Tests use tiny configs, e.g. ``{"train_images": 60, "val_images": 10, ...}``.
    """
    cfg = ShapesWorldConfig.from_any(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    tmp = out_dir.parent / f".{out_dir.name}.generating"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        summary = _generate_into(tmp, cfg, progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def _generate_into(out: Path, cfg: ShapesWorldConfig, progress: bool) -> dict:
    prior = ObjectPrior(cfg.seed, cfg.zipf_exponent, cfg.companions_per_object, cfg.companion_boost)
    spec = cfg.scene_spec()
    annotations: dict[str, list[dict]] = {}
    # 1. scenes and images
    for split, n in cfg.split_sizes().items():
        (out / "images" / split).mkdir(parents=True)
        records = []
        for i in _progress(range(n), n, f"shapesworld {split} images", progress):
            rng = random.Random(f"shapesworld:{cfg.seed}:{split}:{i}:scene")
            scene = sample_scene(rng, prior, spec)
            rel = f"{split}/{i:06d}.png"
            render_scene(scene, cfg.image_size).save(
                out / "images" / rel, format="PNG", optimize=False, compress_level=9
            )
            records.append(
                {
                    "id": f"{split}-{i:06d}",
                    "image": rel,
                    "objects": [o.to_dict(cfg.image_size) for o in scene.objects],
                }
            )
        annotations[split] = records
        write_manifest(out / f"annotations_{split}.jsonl", records)
    # 2. statistics of the training split (POPE popular/adversarial and hard negatives use them)
    stats = ObjectStats.from_scenes([o["name"] for o in rec["objects"]] for rec in annotations["train"])
    negatives = _Negatives(stats, cfg.hard_negative_prob)

    def scene_text(split: str, rec: dict, purpose: str) -> SceneText:
        return SceneText(
            rec["objects"], random.Random(f"shapesworld:{cfg.seed}:{split}:{rec['id']}:{purpose}"), negatives
        )

    # 3. captions (stage 1) and instructions (stages 2/3) for train and val
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        captions, instruct = [], []
        for rec in annotations[split]:
            captions.append(
                {
                    "id": f"cap-{rec['id']}",
                    "image": rec["image"],
                    "conversations": caption_conversation(scene_text(split, rec, "caption")),
                }
            )
            text = scene_text(split, rec, "instruct")
            for j in range(cfg.instruct_per_image):
                conversation = instruction_conversation(
                    text,
                    short_answer_prob=cfg.short_answer_prob,
                    max_turns=cfg.max_turns,
                    multi_turn_prob=cfg.multi_turn_prob,
                )
                instruct.append(
                    {"id": f"inst-{rec['id']}-{j}", "image": rec["image"], "conversations": conversation}
                )
            polling = scene_text(split, rec, "polling")
            for j in range(cfg.polling_per_image):
                instruct.append(
                    {
                        "id": f"poll-{rec['id']}-{j}",
                        "image": rec["image"],
                        "conversations": polling_conversation(polling, cfg.polling_turns),
                    }
                )
            if text.rng.random() < cfg.text_only_fraction:
                instruct.append(
                    {"id": f"text-{rec['id']}", "conversations": text_only_conversation(text.rng)}
                )
        counts[f"captions_{split}"] = write_manifest(out / f"captions_{split}.json", captions)
        counts[f"instruct_{split}"] = write_manifest(out / f"instruct_{split}.json", instruct)
    # 4. short-answer VQA on val and test
    for split in ("val", "test"):
        vqa = []
        for rec in annotations[split]:
            text = scene_text(split, rec, "vqa")
            asked: set[str] = set()
            for j in range(cfg.vqa_per_image):
                qa = vqa_question(text)
                if qa.question in asked:
                    continue
                asked.add(qa.question)
                qid = f"vqa-{rec['id']}-{j}"
                vqa.append(
                    {
                        "question_id": qid,
                        "id": qid,
                        "image": rec["image"],
                        "text": qa.question,
                        "answer": qa.short,
                        "category": qa.category,
                        "conversations": [
                            {
                                "from": "human",
                                "value": f"{IMAGE_TOKEN}\n{qa.question}\n{SHORT_ANSWER_SUFFIX}",
                            },
                            {"from": "gpt", "value": qa.short},
                        ],
                    }
                )
        counts[f"vqa_{split}"] = write_manifest(out / f"vqa_{split}.jsonl", vqa)
    # 5. POPE on the held-out test images
    test_images = [(rec["image"], [o["name"] for o in rec["objects"]]) for rec in annotations["test"]]
    for pope_split in POPE_SPLITS:
        questions = pope_questions(
            test_images, stats, pope_split, seed=cfg.seed, max_positives=cfg.pope_max_positives
        )
        counts[f"pope_{pope_split}"] = write_manifest(out / f"pope_{pope_split}.jsonl", questions)
    # 6. tokenizer trained on the training text, formatted like the chat template
    from moe_llava.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(
        _tokenizer_corpus(out),
        out / "tokenizer",
        vocab_size=cfg.tokenizer_vocab_size,
        model_max_length=cfg.tokenizer_model_max_length,
    )
    # 7. metadata
    summary = {
        "generator_version": GENERATOR_VERSION,
        "images": {split: len(recs) for split, recs in annotations.items()},
        "records": counts,
        "objects": len(prior.objects),
    }
    _write_json(out / "config.json", {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg)})
    _write_json(out / "stats.json", {"summary": summary, "prior": prior.to_dict(), "train": stats.to_dict()})
    (out / "README.md").write_text(_dataset_card(cfg, summary), encoding="utf-8")
    return summary


def _tokenizer_corpus(out: Path) -> Iterable[str]:
    from moe_llava.data.manifest import iter_manifest

    yield DEFAULT_SYSTEM
    for name in ("captions_train.json", "instruct_train.json"):
        for record in iter_manifest(out / name):
            parts = [DEFAULT_SYSTEM]
            for turn in record["conversations"]:
                value = turn["value"].replace(IMAGE_TOKEN, "").strip()
                parts.append(f"USER: {value}" if turn["from"] == "human" else f"ASSISTANT: {value}")
            yield " ".join(parts)


def _dataset_card(cfg: ShapesWorldConfig, summary: dict) -> str:
    lines = [
        "# ShapesWorld (generated)",
        "",
        "Synthetic images of 1-4 coloured shapes, generated by `moe-llava data generate` (do not edit by hand;",
        "regenerate instead). See docs/data.md in the repository.",
        "",
        f"- seed {cfg.seed}, {cfg.image_size}x{cfg.image_size} px, generator version {GENERATOR_VERSION}",
        f"- images: {summary['images']}",
        "- records: " + ", ".join(f"{k} {v}" for k, v in summary["records"].items()),
        "",
    ]
    return "\n".join(lines)
