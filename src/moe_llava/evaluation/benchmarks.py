"""The benchmarks the evaluation runs, one small class each with the same interface.

A :class:`Benchmark` is one question file of one kind (a POPE split, a VQA set):

* ``kind``, ``name``, ``path``; ``key`` (``pope_random``) names its answers file and its scores;
* :meth:`~Benchmark.load` reads and checks the questions (kept in ``questions``);
* :meth:`~Benchmark.score` scores answers (question id -> text) against them;
* :meth:`~Benchmark.metrics` turns a score into flat MLflow metrics (``pope/random/f1``);
* :meth:`~Benchmark.summary` (a class method) adds what spans the files of a kind (``pope/mean_f1``).

:data:`BENCHMARKS` maps a kind to its class; ``evaluation.<selection_key>`` picks the files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from moe_llava.errors import EvalFileError
from moe_llava.evaluation.files import Question, read_questions
from moe_llava.evaluation.pope import mean_f1, score_pope, yes_ratio_by_group
from moe_llava.evaluation.vqa import score_vqa


def metric_name(text: str) -> str:
    """A string usable inside an MLflow metric name (alphanumerics, ``_ - . /`` and spaces)."""
    return re.sub(r"[^\w\-. ]", "_", text).strip() or "_"


def check_questions(questions: Sequence[Question], path: Path, image_folder: str | Path | None) -> None:
    """Structure and image files of every question, before generation; errors name file/record/field."""
    from moe_llava.data.conversation import GPT, role_of
    from moe_llava.data.validation import Validator

    validator = Validator(image_folder=image_folder, image_check="exists")
    bad = []
    for q in questions:
        record = q.record
        if role_of(record["conversations"][-1]) != GPT:  # a generation prompt
            record = {**record, "conversations": [*record["conversations"], {"from": "gpt", "value": "-"}]}
        check = validator.check_record(record, location=q.location)
        if not check.ok:
            bad.append((q, check.issues[0]))
    if bad:
        q, issue = bad[0]
        more = f" (and {len(bad) - 1} more bad question(s))" if len(bad) > 1 else ""
        raise EvalFileError(
            f"question_id {q.question_id!r}: {issue.reason}: {issue.detail}{more}",
            file=path,
            location=q.location,
            field=issue.field,
        )


class Benchmark:
    """One question file of a benchmark kind (subclasses: :class:`PopeBenchmark`, :class:`VqaBenchmark`)."""

    kind: ClassVar[str]
    selection_key: ClassVar[str]  # evaluation.<selection_key>: the names to evaluate (null: all configured)

    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self.questions: list[Question] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {str(self.path)!r})"

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.name}"

    @property
    def metric_prefix(self) -> str:
        return f"{self.kind}/{metric_name(self.name)}"

    def load(
        self, *, prompt_suffix: str | None = None, limit: int | None = None, image_folder=None
    ) -> list[Question]:
        """Read and check the question file (structure, labels/references, image files exist)."""
        questions = read_questions(self.path, kind=self.kind, prompt_suffix=prompt_suffix, limit=limit)
        check_questions(questions, self.path, image_folder)
        self.questions = questions
        return questions

    def score(self, answers: Mapping[str, str]) -> dict[str, Any]:
        """Scores of ``answers`` (question id -> text) against :attr:`questions`, paired by id."""
        raise NotImplementedError

    def metrics(self, score: Mapping[str, Any]) -> dict[str, float]:
        """Flat MLflow metrics of one score: the kind's own, then the question counts."""
        metrics = {f"{self.metric_prefix}/{k}": v for k, v in self._own_metrics(score).items()}
        metrics[f"{self.metric_prefix}/num_questions"] = score["num_questions"]
        metrics[f"{self.metric_prefix}/num_missing"] = score["num_missing"]
        return metrics

    def _own_metrics(self, score: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def summary(cls, scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """Metrics across this kind's files (``scores``: name -> score); none by default."""
        return {}


class PopeBenchmark(Benchmark):
    """A POPE split: yes/no answers, accuracy/precision/recall/F1/yes-ratio; the mean F1 over splits.

    With :attr:`groups` (a ``question record -> group`` callable, ``data.eval.pope_groups``) also the
    yes-ratio per group (``pope/random/yes_ratio/shares_colour``), per split and over all splits.
    """

    kind = "pope"
    selection_key = "pope_splits"
    KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    groups: Callable[[dict], str] | None = None

    def load(
        self, *, prompt_suffix: str | None = None, limit: int | None = None, image_folder=None
    ) -> list[Question]:
        questions = super().load(prompt_suffix=prompt_suffix, limit=limit, image_folder=image_folder)
        if self.groups is None:
            return questions
        for q in questions:  # every question groups, checked before the model loads
            try:
                self.groups(q.source)
            except ValueError as err:
                raise EvalFileError(
                    f"{err} (data.eval.pope_groups cannot group this file; set it to null)",
                    file=self.path,
                    location=q.location,
                ) from None
        return questions

    def score(self, answers: Mapping[str, str]) -> dict[str, Any]:
        score = score_pope(self.questions, answers)
        if self.groups is not None:
            score["groups"] = yes_ratio_by_group(self.questions, answers, self.groups)
        return score

    def _own_metrics(self, score: Mapping[str, Any]) -> dict[str, float]:
        metrics = {k: float(score[k]) for k in self.KEYS}
        for group, stats in (score.get("groups") or {}).items():
            metrics[f"yes_ratio/{metric_name(group)}"] = float(stats["yes_ratio"])
        return metrics

    @classmethod
    def summary(cls, scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        if not scores:
            return {}
        metrics = {"pope/mean_f1": mean_f1(scores)}
        pooled: dict[str, list[float]] = {}
        for score in scores.values():
            for group, stats in (score.get("groups") or {}).items():
                yes_n = pooled.setdefault(group, [0.0, 0.0])
                yes_n[0] += stats["yes_ratio"] * stats["num_questions"]
                yes_n[1] += stats["num_questions"]
        for group, (yes, n) in pooled.items():
            metrics[f"pope/yes_ratio/{metric_name(group)}"] = yes / n
        return metrics


class VqaBenchmark(Benchmark):
    """A short-answer VQA set: exact-match accuracy, overall and per category."""

    kind = "vqa"
    selection_key = "vqa_sets"

    def score(self, answers: Mapping[str, str]) -> dict[str, Any]:
        return score_vqa(self.questions, answers)

    def _own_metrics(self, score: Mapping[str, Any]) -> dict[str, float]:
        metrics = {"accuracy": float(score["accuracy"])}
        for category, stats in score["categories"].items():
            metrics[f"{metric_name(category)}/accuracy"] = float(stats["accuracy"])
        return metrics


BENCHMARKS: dict[str, type[Benchmark]] = {cls.kind: cls for cls in (PopeBenchmark, VqaBenchmark)}
