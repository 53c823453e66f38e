"""A small dataset in the official LLaVA formats, with the record variants the real files have.

``write_llava_like(root)`` writes, under ``root``:

* ``blip_laion_cc_sbu_558k.json``: LLaVA-PT captions (``<image>`` *after* the instruction, string ids
  with leading zeros, images in numbered subfolders);
* ``llava_v1_5_mix665k.json``: LLaVA-mix665k's kinds of records: LLaVA-Instruct conversations
  (``<image>\\n`` first), VQAv2/GQA-style short answers with the paper's instruction suffix and
  ``<image>`` after the question, OCR-VQA with integer ids, text-only ShareGPT conversations with an
  extra ``model`` key, some of them long (over a 2k-token budget) and some starting with the
  assistant (``gpt``) as a few ShareGPT conversations do;
* ``images/``: PNGs (``coco/train2017``, ``gqa/images``, ``ocr_vqa/images``, ``00000``...);
* ``eval/pope/coco_pope_{random,popular,adversarial}.json``: POPE as published (JSON Lines with
  integer ``question_id``, ``image``, ``text``, ``label``) over ``eval/val2014/`` images.

Everything is derived from ``seed``; the counts of each kind are in the returned dict.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")
WORDS = tuple(
    [
        "the",
        "model",
        "answers",
        "questions",
        "about",
        "images",
        "and",
        "writes",
        "code",
        "explains",
        "ideas",
        "and",
        "tells",
        "stories",
        "with",
        "many",
        "words",
        "in",
        "long",
        "replies",
        "to",
        "users",
        "who",
        "ask",
        "for",
        "details",
        "about",
        "history",
        "science",
        "and",
        "art",
    ]
)
VQA_SUFFIX = "Answer the question using a single word or phrase."


def _image(path: Path, colour: str, shape: str, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    image.save(path)


def _prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_llava_like(
    root: Path,
    *,
    seed: int = 0,
    captions: int = 24,
    instruct: int = 12,
    vqa: int = 12,
    ocr: int = 6,
    sharegpt: int = 10,
    long_sharegpt: int = 2,
    leading_gpt: int = 2,
    pope_per_split: int = 6,
) -> dict[str, int]:
    """Write the files above under ``root``; returns the number of records of each kind."""
    rng = random.Random(seed)
    images = root / "images"

    def scene(rel: str) -> tuple[str, str]:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        _image(images / rel, colour, shape)
        return colour, shape

    pretrain = []
    for i in range(captions):
        rel = f"{i // 10:05d}/{i:09d}.png"
        colour, shape = scene(rel)
        instruction = rng.choice(
            ["Render a clear and concise summary of the photo.", "Give a brief description of the image."]
        )
        pretrain.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"{instruction}\n<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape} on a white background"},
                ],
            }
        )

    mix = []
    for i in range(instruct):  # LLaVA-Instruct: <image> first, multi-turn
        rel = f"coco/train2017/{100000 + i:012d}.png"
        colour, shape = scene(rel)
        turns = [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"},
            {"from": "gpt", "value": f"There is a {shape} in the image."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": f"The {shape} is {colour}."},
        ]
        mix.append({"id": f"{100000 + i:012d}", "image": rel, "conversations": turns})
    for i in range(vqa):  # VQAv2 / GQA: short answers, <image> after the first question
        rel = f"gqa/images/{2300000 + i}.png"
        colour, shape = scene(rel)
        turns = [
            {"from": "human", "value": f"What colour is the {shape}?\n<image>\n{VQA_SUFFIX}"},
            {"from": "gpt", "value": colour.capitalize()},
            {"from": "human", "value": f"Is there a {shape} in the image?\n{VQA_SUFFIX}"},
            {"from": "gpt", "value": "Yes"},
        ]
        mix.append({"id": f"{2300000 + i}", "image": rel, "conversations": turns})
    for i in range(ocr):  # OCR-VQA: integer ids
        rel = f"ocr_vqa/images/{140031996 + i}.png"
        colour, _ = scene(rel)
        turns = [
            {"from": "human", "value": f"<image>\nWhat is the colour of this book's cover?\n{VQA_SUFFIX}"},
            {"from": "gpt", "value": colour},
        ]
        mix.append({"id": 140031996 + i, "image": rel, "conversations": turns})
    for i in range(sharegpt + long_sharegpt + leading_gpt):  # ShareGPT: text only, an extra key
        long = sharegpt <= i < sharegpt + long_sharegpt
        exchanges = 12 if long else rng.randint(1, 3)
        turns = []
        for _ in range(exchanges):
            turns.append({"from": "human", "value": _prose(rng, 8)})
            turns.append({"from": "gpt", "value": _prose(rng, 200 if long else 20)})
        if i >= sharegpt + long_sharegpt:  # begins with the assistant's reply to an unseen question
            turns.insert(0, {"from": "gpt", "value": _prose(rng, 10)})
        mix.append({"id": f"sharegpt_{i}_0", "model": "", "conversations": turns})
    rng.shuffle(mix)

    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain, indent=1))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(mix, indent=1))

    pope_dir = root / "eval" / "pope"
    pope_dir.mkdir(parents=True, exist_ok=True)
    qid = 1
    for split in ("random", "popular", "adversarial"):
        lines = []
        for k in range(pope_per_split):
            name = f"COCO_val2014_{300000 + qid:012d}.png"
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            _image(root / "eval" / "val2014" / name, colour, shape)
            present = k % 2 == 0
            asked = shape if present else next(s for s in SHAPES if s != shape)
            lines.append(
                {"question_id": qid, "image": name, "text": f"Is there a {asked} in the image?",
                 "label": "yes" if present else "no"}
            )  # fmt: skip
            qid += 1
        (pope_dir / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {
        "captions": captions,
        "mix": len(mix),
        "text_only": sharegpt + long_sharegpt + leading_gpt,
        "long": long_sharegpt,
        "leading_gpt": leading_gpt,
        "integer_ids": ocr,
        "pope_per_split": pope_per_split,
    }
