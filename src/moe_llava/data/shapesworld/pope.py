"""POPE question files for ShapesWorld (random, popular, adversarial), built like the original POPE.

For each held-out image: the positives are (up to ``max_positives``) objects present in the image,
and as many negatives (objects truly absent from it) are chosen

* ``random``: uniformly among the absent objects;
* ``popular``: the absent objects that are most frequent in the training set;
* ``adversarial``: the absent objects that co-occur most often (in the training set) with the
  objects present in the image.

So every split is exactly balanced yes/no. Records are in the POPE format (``question_id``,
``image``, ``text``, ``label``) plus ``object`` and ``category``. Each record also carries ``id`` and
LLaVA ``conversations`` (the question with LLaVA's short-answer instruction, and the expected short
answer), so ``LlavaDataset(..., generation=True)`` reads a POPE file as is.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.shapesworld.text import SHORT_ANSWER_SUFFIX
from moe_llava.data.shapesworld.vocab import all_objects

POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class ObjectStats:
    """Per-object image frequency and pairwise co-occurrence counts over a set of scenes."""

    frequency: Counter = field(default_factory=Counter)
    cooccurrence: Counter = field(default_factory=Counter)  # key: "a|b" with a < b
    images: int = 0

    @classmethod
    def from_scenes(cls, scenes: Iterable[Iterable[str]]) -> ObjectStats:
        stats = cls()
        for names in scenes:
            present = sorted(set(names))
            stats.images += 1
            stats.frequency.update(present)
            for i, a in enumerate(present):
                for b in present[i + 1 :]:
                    stats.cooccurrence[f"{a}|{b}"] += 1
        return stats

    def cooc(self, a: str, b: str) -> int:
        if a == b:
            return 0
        return self.cooccurrence.get(f"{a}|{b}" if a < b else f"{b}|{a}", 0)

    def popular_order(self, candidates: Iterable[str]) -> list[str]:
        """Most frequent first; ties by name (deterministic)."""
        return sorted(candidates, key=lambda o: (-self.frequency.get(o, 0), o))

    def adversarial_order(self, present: Iterable[str], candidates: Iterable[str]) -> list[str]:
        """Highest summed co-occurrence with the present objects first; ties by frequency, then name."""
        present = list(present)
        return sorted(
            candidates, key=lambda o: (-sum(self.cooc(o, p) for p in present), -self.frequency.get(o, 0), o)
        )

    def negatives(self, present: set[str], k: int, strategy: str, rng: random.Random) -> list[str]:
        absent = [o for o in all_objects() if o not in present]
        if strategy == "random":
            return rng.sample(absent, k)
        if strategy == "popular":
            return self.popular_order(absent)[:k]
        if strategy == "adversarial":
            return self.adversarial_order(sorted(present), absent)[:k]
        raise ValueError(f"unknown negative strategy {strategy!r}")

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "frequency": dict(sorted(self.frequency.items(), key=lambda kv: (-kv[1], kv[0]))),
            "cooccurrence": dict(sorted(self.cooccurrence.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


def pope_questions(
    images: list[tuple[str, list[str]]], stats: ObjectStats, split: str, *, seed: int, max_positives: int = 3
) -> list[dict]:
    """POPE records for ``images`` = ``[(image_relpath, present object names)]``."""
    if split not in POPE_SPLITS:
        raise ValueError(f"POPE split must be one of {POPE_SPLITS}, got {split!r}")
    records: list[dict] = []
    for image, names in images:
        rng = random.Random(f"pope:{seed}:{split}:{image}")
        present = sorted(set(names))
        positives = rng.sample(present, min(max_positives, len(present)))
        negatives = stats.negatives(set(present), len(positives), split, rng)
        for positive, negative in zip(positives, negatives):
            for obj, label in ((positive, "yes"), (negative, "no")):
                article = "an" if obj[0] in "aeiou" else "a"
                question = f"Is there {article} {obj} in the image?"
                qid = f"pope-{split}-{len(records):05d}"
                prompt = f"{question}\n{SHORT_ANSWER_SUFFIX}"
                records.append(
                    {
                        "question_id": qid,
                        "id": qid,
                        "image": image,
                        "text": question,
                        "label": label,
                        "object": obj,
                        "category": split,
                        "conversations": [
                            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                            {"from": "gpt", "value": label.capitalize()},
                        ],
                    }
                )
    return records


# How an asked object relates to the objects of the scene: for absent objects, which of its two
# attributes a present object shares. A model that checks only the colour says "yes" to
# `shares_colour` negatives; one that binds colour to shape says "no" to them.
RELATIONS = ("present", "shares_colour", "shares_shape", "shares_colour_and_shape", "unrelated")


def relation_to_scene(name: str, present: Iterable[str]) -> str:
    """One of :data:`RELATIONS` for the object ``name`` ("<colour> <shape>") asked about a scene."""
    present = set(present)
    if name in present:
        return "present"
    colour, shape = name.split(" ")
    colour_shared = any(p.split(" ")[0] == colour for p in present)
    shape_shared = any(p.split(" ")[1] == shape for p in present)
    if colour_shared and shape_shared:
        return "shares_colour_and_shape"
    return "shares_colour" if colour_shared else "shares_shape" if shape_shared else "unrelated"


class SceneRelations:
    """``question record -> relation`` for POPE records (``image``, ``object``) on annotated scenes.

    The evaluation groups POPE answers by it (``data.eval.pope_groups``): the yes-ratio per group
    shows which absent objects the model hallucinates.
    """

    def __init__(self, scenes: str):
        from moe_llava.data.manifest import iter_entries

        self.path = str(scenes)
        if not Path(scenes).is_file():
            raise ValueError(f"scene annotations not found: {scenes}")
        self.objects: dict[str, list[str]] = {}
        for entry in iter_entries(scenes):
            record = entry.record
            if entry.error is not None or not isinstance(record, dict) or "image" not in record:
                raise ValueError(
                    f"{scenes}: {entry.location}: {entry.error or 'an annotation needs image and objects'}"
                )
            try:
                self.objects[record["image"]] = [str(o["name"]) for o in record["objects"]]
            except (KeyError, TypeError):
                raise ValueError(
                    f"{scenes}: {entry.location}: field 'objects' must list objects with a 'name'"
                ) from None

    def __call__(self, record: dict) -> str:
        image, name = record.get("image"), record.get("object")
        if image not in self.objects:
            raise ValueError(f"question {record.get('id')!r}: image {image!r} is not in {self.path}")
        if not isinstance(name, str) or len(name.split(" ")) != 2:
            raise ValueError(
                f"question {record.get('id')!r}: field 'object' must be '<colour> <shape>', got {name!r}"
            )
        return relation_to_scene(name, self.objects[image])
