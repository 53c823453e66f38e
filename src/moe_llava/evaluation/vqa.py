"""Short-answer VQA accuracy: exact match after normalisation, overall and per ``category``.

Normalisation (:func:`normalize_answer`), applied to the prediction and the reference alike,
follows the short-answer convention of the LLaVA/VQA evaluations:

1. keep the text before the first sentence-ending ``.`` (a ``.`` between digits, as in ``3.5``, is
   not one);
2. lower-case; ``1,000`` -> ``1000``;
3. punctuation becomes a space (apostrophes are dropped: ``it's`` -> ``its``);
4. number words become digits (``zero`` ... ``twenty``, and ``none`` -> ``0`` as in the VQA
   evaluation); the articles ``a``, ``an``, ``the`` are removed; whitespace is collapsed.

So ``"Two."`` matches ``"2"`` and ``"The red circle"`` matches ``"red circle"``, but
``"Yes, there is"`` does not match ``"yes"``: the model is asked for a single word or phrase.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from moe_llava.evaluation.files import Question
from moe_llava.evaluation.pairing import pair_answers

NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period not between two digits
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace(".", "").replace("'", "")) + "]")


def normalize_answer(text: str) -> str:
    """The comparable form of a short answer (see the module docstring)."""
    text = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].lower()
    text = _THOUSANDS.sub("", text).replace("'", "").replace("\u2019", "")
    text = _PUNCTUATION.sub(" ", text)  # the periods left are decimal points (3.5)
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES)


def _accuracy(correct: int, total: int) -> float:
    return correct / total if total else 0.0


def score_vqa(questions: Sequence[Question], answers: Mapping[str, str]) -> dict[str, Any]:
    """Exact-match accuracy over the answered questions (paired by id), overall and per category.

    Returns ``accuracy``, ``num_correct``, ``categories`` (``{name: {accuracy, num_questions,
    num_correct}}``, questions without a category are under ``"none"``) and the pairing report.
    """
    for q in questions:
        if q.answer is None:
            raise ValueError(f"question_id {q.question_id!r} ({q.location}) has no reference answer")
    pairing = pair_answers(questions, answers)
    correct = 0
    categories: dict[str, dict[str, int]] = {}
    for question, text in pairing.pairs:
        hit = normalize_answer(text) == normalize_answer(question.answer)
        correct += hit
        stats = categories.setdefault(question.category or "none", {"num_questions": 0, "num_correct": 0})
        stats["num_questions"] += 1
        stats["num_correct"] += hit
    return {
        "accuracy": _accuracy(correct, len(pairing.pairs)),
        "num_correct": correct,
        "categories": {
            name: {"accuracy": _accuracy(s["num_correct"], s["num_questions"]), **s}
            for name, s in sorted(categories.items())
        },
        **pairing.report(),
    }
