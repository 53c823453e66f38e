"""Our scoring rules as lmms-eval task functions (``!function moe_llava.evaluation.lmms_scoring.X``).

The task folders in ``moe_llava/evaluation/lmms_tasks/`` call these; they reuse the evaluator's
own code (:mod:`moe_llava.evaluation.pope`, :mod:`moe_llava.evaluation.vqa`), so lmms-eval scores
exactly as ``moe-llava eval run`` does:

* POPE: the paper's answer rule (:func:`~moe_llava.evaluation.pope.pope_yes_no`: "Yes." is *yes*),
  and the yes-ratio of the *model's* answers (lmms-eval's own POPE task scores an exact match and
  reports the ground truth's yes-ratio);
* short-answer VQA: exact match after :func:`~moe_llava.evaluation.vqa.normalize_answer`.

No lmms_eval import here: the functions take and return plain documents, answers and dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.evaluation.pope import PopeCounts, pope_yes_no
from moe_llava.evaluation.vqa import normalize_answer

# ShapesWorld tasks read their question files relative to the working directory (the repository
# root, as `make run` does) unless `moe-llava eval benchmark --data-root` rewrote them; the images
# are looked up under this folder.
SHAPESWORLD_IMAGES_ENV = "MOE_LLAVA_SHAPESWORLD_IMAGES"
DEFAULT_SHAPESWORLD_IMAGES = "data/shapesworld/images"
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


# ---------------------------------------------------------------------- documents -> prompts
def shapesworld_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The question's image file (a path; the adapter reads it like the evaluator does); [] if none."""
    image = doc.get("image")
    if not image:
        return []
    folder = Path(os.environ.get(SHAPESWORLD_IMAGES_ENV) or DEFAULT_SHAPESWORLD_IMAGES)
    path = folder / image
    if not path.is_file():
        raise FileNotFoundError(
            f"question {doc.get('question_id')!r}: image {path} not found "
            f"(images are read from ${SHAPESWORLD_IMAGES_ENV}, default {DEFAULT_SHAPESWORLD_IMAGES})"
        )
    return [str(path)]


def conversation_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as our evaluator asks it: the last human turn of ``conversations`` (its image
    placeholder dropped: the adapter puts the image first, as the file's turn has it), else ``text``
    with the task's ``post_prompt``."""
    kwargs = lmms_eval_specific_kwargs or {}
    turns = [t for t in doc.get("conversations") or [] if t.get("from") in ("human", "user")]
    if turns:
        text = turns[-1]["value"]
        return text[len(IMAGE_TOKEN) + 1 :] if text.startswith(f"{IMAGE_TOKEN}\n") else text
    return f"{kwargs.get('pre_prompt', '')}{doc['text'].strip()}{kwargs.get('post_prompt', '')}"


def question_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The hub POPE documents (``question``): the question with the task's pre/post prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def hub_image_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


# ---------------------------------------------------------------------- POPE
def _pope_label(doc: dict[str, Any]) -> str:
    label = doc.get("label", doc.get("answer"))
    label = str(label).strip().rstrip(".").strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"question {doc.get('question_id')!r}: POPE label must be yes/no, got {label!r}")
    return label


def pope_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, str]]:
    """One answer -> the same record under each POPE metric (the aggregations count them)."""
    answer = results[0] if results else ""
    record = {
        "question_id": str(doc.get("question_id")),
        "label": _pope_label(doc),
        "prediction": pope_yes_no(answer),
        "answer": answer,
    }
    return dict.fromkeys(POPE_METRICS, record)


def _pope_metrics(records: list[dict[str, str]]) -> dict[str, float]:
    counts = PopeCounts.from_predictions([r["label"] for r in records], [r["prediction"] for r in records])
    return counts.metrics()


def pope_accuracy(records: list[dict[str, str]]) -> float:
    return _pope_metrics(records)["accuracy"]


def pope_precision(records: list[dict[str, str]]) -> float:
    return _pope_metrics(records)["precision"]


def pope_recall(records: list[dict[str, str]]) -> float:
    return _pope_metrics(records)["recall"]


def pope_f1(records: list[dict[str, str]]) -> float:
    return _pope_metrics(records)["f1"]


def pope_yes_ratio(records: list[dict[str, str]]) -> float:
    """The share of the model's answers that are *yes* (not the ground truth's)."""
    return _pope_metrics(records)["yes_ratio"]


# ---------------------------------------------------------------------- short-answer VQA
def vqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after our normalisation (``"Two."`` matches ``"2"``)."""
    answer = results[0] if results else ""
    reference = doc.get("answer")
    if reference is None:
        turns = [t for t in doc.get("conversations") or [] if t.get("from") in ("gpt", "assistant")]
        reference = turns[-1]["value"] if turns else None
    if reference is None:
        raise ValueError(f"question {doc.get('question_id')!r}: no reference answer")
    return {"accuracy": float(normalize_answer(answer) == normalize_answer(str(reference)))}
