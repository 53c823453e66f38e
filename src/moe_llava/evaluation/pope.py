"""POPE (object hallucination): yes/no answer normalisation and metrics, as the paper evaluates them.

Normalisation is the official LLaVA/MoE-LLaVA ``eval_pope.py`` rule, kept verbatim so numbers stay
comparable with published ones: keep the text before the first ``.``, remove commas, split on
spaces; the answer is *no* if any word is exactly ``No``, ``not`` or ``no``, otherwise *yes*.
Consequences of the rule (tested): ``"Not really"`` and ``"Nope"`` count as *yes* (``Not`` is
capitalised, ``Nope`` is another word), an empty answer counts as *yes*, ``"There is no red star"``
is *no*, and ``"Yes, there is a cat, not a dog"`` is *no*.

Metrics treat *yes* as the positive class: accuracy, precision, recall, F1 and the yes-ratio
(share of answers that are *yes*). The headline POPE number is the mean F1 over the three splits.
All values are fractions in [0, 1] (the paper prints percentages); 0/0 is reported as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moe_llava.evaluation.files import Question
from moe_llava.evaluation.pairing import pair_answers

POPE_SPLITS = ("random", "popular", "adversarial")
NEGATIVE_WORDS = ("No", "not", "no")


def pope_yes_no(text: str) -> str:
    """``"yes"`` or ``"no"`` for a free-form answer, by the paper's rule (see the module docstring)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(word in NEGATIVE_WORDS for word in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@dataclass
class PopeCounts:
    """Confusion matrix with *yes* as the positive class."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def from_predictions(cls, labels: Sequence[str], predictions: Sequence[str]) -> PopeCounts:
        if len(labels) != len(predictions):
            raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
        counts = cls()
        for label, pred in zip(labels, predictions):
            if label not in ("yes", "no") or pred not in ("yes", "no"):
                raise ValueError(f"labels and predictions must be 'yes'/'no', got {label!r}/{pred!r}")
            if pred == "yes":
                if label == "yes":
                    counts.tp += 1
                else:
                    counts.fp += 1
            elif label == "no":
                counts.tn += 1
            else:
                counts.fn += 1
        return counts

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float]:
        precision = _ratio(self.tp, self.tp + self.fp)
        recall = _ratio(self.tp, self.tp + self.fn)
        return {
            "accuracy": _ratio(self.tp + self.tn, self.total),
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(self.tp + self.fp, self.total),
        }


def score_pope(questions: Sequence[Question], answers: Mapping[str, str]) -> dict[str, Any]:
    """Metrics of one POPE split over the answered questions, paired by id.

    Returns the five metrics, the confusion counts (``tp``, ``fp``, ``tn``, ``fn``) and the pairing
    report (``num_missing`` / ``missing_ids`` for unanswered questions, ``num_unknown`` /
    ``unknown_ids`` for answers to ids not in the question file).
    """
    for q in questions:
        if q.label is None:
            raise ValueError(f"question_id {q.question_id!r} ({q.location}) has no yes/no label")
    pairing = pair_answers(questions, answers)
    counts = PopeCounts.from_predictions(
        [q.label for q, _ in pairing.pairs], [pope_yes_no(text) for _, text in pairing.pairs]
    )
    return {
        **counts.metrics(),
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
        **pairing.report(),
    }


def yes_ratio_by_group(
    questions: Sequence[Question], answers: Mapping[str, str], group: Callable[[dict], str]
) -> dict[str, dict[str, float]]:
    """``{group: {"yes_ratio", "num_questions"}}`` over the answered questions; ``group`` maps a
    question's record as its file has it to its group (e.g. how the asked object relates to the scene)."""
    yes: dict[str, int] = {}
    total: dict[str, int] = {}
    for q, text in pair_answers(questions, answers).pairs:
        name = group(q.source)
        total[name] = total.get(name, 0) + 1
        yes[name] = yes.get(name, 0) + (pope_yes_no(text) == "yes")
    return {name: {"yes_ratio": yes[name] / n, "num_questions": n} for name, n in sorted(total.items())}


def mean_f1(split_scores: Mapping[str, Mapping[str, Any]]) -> float:
    """The headline POPE number: the mean of the splits' F1."""
    if not split_scores:
        raise ValueError("no POPE split was scored")
    return sum(float(s["f1"]) for s in split_scores.values()) / len(split_scores)
