"""ShapesWorld language: captions, instruction conversations, short-answer VQA and text-only samples.

Everything is derived from the scene annotation, so every answer is true by construction.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.shapesworld.vocab import (
    COLOURS,
    NUMBER_WORDS,
    POSITION_NAMES,
    POSITION_PHRASES,
    SHAPE_PLURALS,
    SHAPES,
    all_objects,
)

_ROW = {name: row for row, names in enumerate(POSITION_NAMES) for name in names}
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What is in this image?",
    "Summarize the visual content of the image.",
    "Write a brief caption for the image.",
)
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "What do you see in the image?",
    "Describe the objects in this picture.",
)


@dataclass
class QA:
    question: str
    answer: str  # full sentence
    short: str  # single word or phrase
    category: str


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(n: int, singular: str, plural: str) -> str:
    return f"{NUMBER_WORDS[n]} {singular if n == 1 else plural}"


class SceneText:
    """Question/answer/caption generators for one annotated scene.

    ``objects`` are annotation dicts (``name``, ``colour``, ``shape``, ``position``, ``center``, ``size``).
    ``negatives`` proposes absent objects for existence questions (``rng, present, k -> names``).
    """

    def __init__(
        self,
        objects: list[dict],
        rng: random.Random,
        negatives: Callable[[random.Random, set[str], int], list[str]],
    ):
        self.objects = objects
        self.rng = rng
        self.negatives = negatives
        self.names = Counter(o["name"] for o in objects)
        self.shapes = Counter(o["shape"] for o in objects)
        self.colours = Counter(o["colour"] for o in objects)

    # ---------------------------------------------------------------- captions
    def caption(self) -> str:
        rng = self.rng
        reading_order = sorted(self.objects, key=lambda o: (_ROW[o["position"]], o["center"][0]))
        order = reading_order if rng.random() < 0.5 else list(self.objects)
        parts = [f"{_article(o['name'])} {POSITION_PHRASES[o['position']]}" for o in order]
        body = _join(parts)
        style = rng.randrange(4)
        if style == 0:
            text = f"There {'is' if len(parts) == 1 else 'are'} {body}."
            if len(parts) > 1:
                text = f"There are {_count_phrase(len(parts), 'object', 'objects')}: {body}."
        elif style == 1:
            text = f"The image shows {body}."
        elif style == 2:
            text = f"A picture of {body}."
        else:
            text = body[0].upper() + body[1:] + "."
        return text

    # ---------------------------------------------------------------- questions
    def existence(self, positive: bool) -> QA:
        if positive:
            obj = self.rng.choice(self.objects)
            name = obj["name"]
            answer = f"Yes, there is {_article(name)} {POSITION_PHRASES[obj['position']]}."
            return QA(f"Is there {_article(name)} in the image?", answer, "Yes", "existence")
        name = self.negatives(self.rng, set(self.names), 1)[0]
        return QA(
            f"Is there {_article(name)} in the image?",
            f"No, there is no {name} in the image.",
            "No",
            "existence",
        )

    def colour(self) -> QA | None:
        unique = [s for s, n in self.shapes.items() if n == 1]
        if not unique:
            return None
        shape = self.rng.choice(sorted(unique))
        colour = next(o["colour"] for o in self.objects if o["shape"] == shape)
        return QA(f"What colour is the {shape}?", f"The {shape} is {colour}.", colour.capitalize(), "colour")

    def shape(self) -> QA | None:
        unique = [c for c, n in self.colours.items() if n == 1]
        if not unique:
            return None
        colour = self.rng.choice(sorted(unique))
        shape = next(o["shape"] for o in self.objects if o["colour"] == colour)
        return QA(
            f"What shape is the {colour} object?",
            f"The {colour} object is {_article(shape)}.",
            shape.capitalize(),
            "shape",
        )

    def count(self) -> QA:
        if self.rng.random() < 0.4:
            n = len(self.objects)
            answer = (
                f"There {'is' if n == 1 else 'are'} {_count_phrase(n, 'object', 'objects')} in the image."
            )
            return QA("How many objects are there in the image?", answer, str(n), "count")
        shape = self.rng.choice(sorted(self.shapes)) if self.rng.random() < 0.7 else self.rng.choice(SHAPES)
        n = self.shapes.get(shape, 0)
        plural = SHAPE_PLURALS[shape]
        answer = f"There {'is' if n == 1 else 'are'} {_count_phrase(n, shape, plural)}."
        return QA(f"How many {plural} are there?", answer, str(n), "count")

    def position(self) -> QA | None:
        unique = [o for o in self.objects if self.names[o["name"]] == 1]
        if not unique:
            return None
        obj = self.rng.choice(unique)
        phrase = POSITION_PHRASES[obj["position"]]
        return QA(
            f"Where is the {obj['name']}?", f"The {obj['name']} is {phrase}.", obj["position"], "position"
        )

    def relation(self) -> QA | None:
        unique = [o for o in self.objects if self.names[o["name"]] == 1]
        pairs = [
            (a, b, axis)
            for a in unique
            for b in unique
            if a is not b
            for axis in (0, 1)
            if abs(a["center"][axis] - b["center"][axis]) > (a["size"] + b["size"]) / 4
        ]
        if not pairs:
            return None
        a, b, axis = self.rng.choice(pairs)
        relation = "to the left of" if axis == 0 else "above"
        truth = a["center"][axis] < b["center"][axis]
        question = f"Is the {a['name']} {relation} the {b['name']}?"
        if truth:
            answer = f"Yes, the {a['name']} is {relation} the {b['name']}."
        else:
            answer = f"No, the {a['name']} is {'to the right of' if axis == 0 else 'below'} the {b['name']}."
        return QA(question, answer, "Yes" if truth else "No", "relation")

    def describe(self) -> QA:
        caption = self.caption()
        return QA(self.rng.choice(DESCRIBE_PROMPTS), caption, caption, "describe")

    def random_qa(self) -> QA:
        """One question; existence questions (balanced yes/no) are the most common."""
        rng = self.rng
        kind = rng.choices(
            ("exist_yes", "exist_no", "colour", "shape", "count", "position", "relation", "describe"),
            weights=(20, 20, 12, 10, 12, 10, 8, 8),
            k=1,
        )[0]
        qa: QA | None
        if kind == "exist_yes":
            qa = self.existence(True)
        elif kind == "exist_no":
            qa = self.existence(False)
        else:
            qa = getattr(self, kind)()
        return qa if qa is not None else self.existence(rng.random() < 0.5)


def instruction_conversation(
    text: SceneText, *, short_answer_prob: float, max_turns: int, multi_turn_prob: float
) -> list[dict]:
    """A LLaVA conversation about one scene; the first human turn carries the ``<image>`` placeholder."""
    rng = text.rng
    turns = rng.randint(2, max_turns) if rng.random() < multi_turn_prob else 1
    conversation: list[dict] = []
    asked: set[str] = set()
    for t in range(turns):
        for _ in range(5):
            qa = text.random_qa()
            if qa.question not in asked:
                break
        asked.add(qa.question)
        short = qa.category != "describe" and rng.random() < short_answer_prob
        question = f"{qa.question}\n{SHORT_ANSWER_SUFFIX}" if short else qa.question
        if t == 0:
            question = f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.85 else f"{question}\n{IMAGE_TOKEN}"
        conversation.append({"from": "human", "value": question})
        conversation.append({"from": "gpt", "value": qa.short if short else qa.answer})
    return conversation


def polling_conversation(text: SceneText, turns: int) -> list[dict]:
    """Short existence questions about one scene, half "Yes" and half "No", in random order.

    Dense grounding supervision, like the short-answer VQA that makes up much of LLaVA-1.5's
    instruction mix: one image, several one-word answers. Half of the absent objects share a
    colour or a shape with a present one (near misses); the others come from ``text.negatives``
    (random or hard, as for the other training questions).
    """
    rng = text.rng
    present = sorted(text.names)
    n_yes = (turns + 1) // 2
    positives = rng.sample(present, min(n_yes, len(present)))
    positives += rng.choices(present, k=n_yes - len(positives))
    near = [
        name
        for name in all_objects()
        if name not in text.names
        and any(
            name.split(" ")[0] == p.split(" ")[0] or name.split(" ")[1] == p.split(" ")[1] for p in present
        )
    ]
    n_no = turns - n_yes
    n_near = min(n_no // 2, len(near))
    negatives = rng.sample(near, n_near)
    negatives += text.negatives(rng, set(text.names) | set(negatives), n_no - n_near)
    questions = [(name, "Yes") for name in positives] + [(name, "No") for name in negatives]
    rng.shuffle(questions)
    conversation: list[dict] = []
    for t, (name, answer) in enumerate(questions):
        question = f"Is there {_article(name)} in the image?\n{SHORT_ANSWER_SUFFIX}"
        conversation.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if t == 0 else question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def caption_conversation(text: SceneText) -> list[dict]:
    return [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{text.rng.choice(CAPTION_PROMPTS)}"},
        {"from": "gpt", "value": text.caption()},
    ]


SIDES = {"triangle": 3, "square": 4, "diamond": 4, "star": 10, "cross": 12}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple"}


def text_only_conversation(rng: random.Random) -> list[dict]:
    """A question that needs no image (keeps the language model's text skills; text-only batches)."""
    kind = rng.randrange(5)
    if kind == 0:
        shape = rng.choice(sorted(SIDES))
        n = SIDES[shape]
        q, a = (
            f"How many sides does a {shape} have?",
            f"A {shape} has {NUMBER_WORDS[n]} sides." if n <= 10 else f"A {shape} has {n} sides.",
        )
    elif kind == 1:
        (c1, c2), mixed = rng.choice(sorted(MIXES.items()))
        if rng.random() < 0.5:
            c1, c2 = c2, c1
        q, a = f"Which colour do you get by mixing {c1} and {c2}?", f"Mixing {c1} and {c2} gives {mixed}."
    elif kind == 2:
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        q, a = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    elif kind == 3:
        k = rng.randint(2, 4)
        colours = rng.sample(sorted(COLOURS), k)
        q, a = f"Name {NUMBER_WORDS[k]} colours.", _join(colours).capitalize() + "."
    else:
        name = rng.choice(all_objects())
        colour, shape = name.split(" ")
        q, a = f"What colour is a {name}?", f"A {name} is {colour}; its shape is {_article(shape)}."
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def vqa_question(text: SceneText) -> QA:
    """A short-answer VQA question (category in existence/colour/shape/count/position/relation)."""
    for _ in range(10):
        qa = text.random_qa()
        if qa.category != "describe":
            return qa
    return text.count()
