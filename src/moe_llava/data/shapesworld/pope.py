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
