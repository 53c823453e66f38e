"""The benchmark objects: one interface for POPE and VQA (key, score, metrics, summary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_llava.evaluation.benchmarks import BENCHMARKS, PopeBenchmark, VqaBenchmark
from moe_llava.evaluation.files import Question


def _question(qid: str, **fields) -> Question:
    return Question(qid, int(qid), {"id": qid}, f"question {qid}?", **fields)


def test_pope_split():
    bench = PopeBenchmark("random", Path("pope_random.jsonl"))
    bench.questions = [_question("1", label="yes"), _question("2", label="no"), _question("3", label="no")]
    score = bench.score({"1": "Yes, there is.", "2": "Yes.", "9": "No"})  # 3 unanswered, 9 unknown
    assert (score["tp"], score["fp"], score["num_missing"], score["num_unknown"]) == (1, 1, 1, 1)
    assert bench.key == "pope_random"
    assert bench.metrics(score) == {
        "pope/random/accuracy": 0.5,
        "pope/random/precision": 0.5,
        "pope/random/recall": 1.0,
        "pope/random/f1": pytest.approx(2 / 3),
        "pope/random/yes_ratio": 1.0,
        "pope/random/num_questions": 3,
        "pope/random/num_missing": 1,
    }
    assert PopeBenchmark.summary({"random": {"f1": 0.5}, "popular": {"f1": 1.0}}) == {"pope/mean_f1": 0.75}
    assert PopeBenchmark.summary({}) == {}


def test_pope_split_grouped():
    bench = PopeBenchmark("random", Path("pope_random.jsonl"))
    bench.groups = lambda record: record["kind"]
    kinds = {"1": "present", "2": "shares_colour", "3": "shares_colour", "4": "unrelated"}
    bench.questions = [
        _question(q, label="yes" if k == "present" else "no", source={"kind": k}) for q, k in kinds.items()
    ]
    score = bench.score({"1": "Yes", "2": "Yes", "3": "No", "4": "No, there is not."})
    assert score["groups"] == {
        "present": {"yes_ratio": 1.0, "num_questions": 1},
        "shares_colour": {"yes_ratio": 0.5, "num_questions": 2},
        "unrelated": {"yes_ratio": 0.0, "num_questions": 1},
    }
    metrics = bench.metrics(score)
    assert metrics["pope/random/yes_ratio/shares_colour"] == 0.5 and metrics["pope/random/yes_ratio"] == 0.5
    other = {"f1": 1.0, "groups": {"shares_colour": {"yes_ratio": 1.0, "num_questions": 2}}}
    summary = PopeBenchmark.summary({"random": score, "popular": other})
    assert summary["pope/yes_ratio/shares_colour"] == 0.75  # pooled over the splits' questions
    assert summary["pope/yes_ratio/present"] == 1.0 and "pope/mean_f1" in summary


def test_vqa_set():
    bench = VqaBenchmark("test set", Path("vqa_test.jsonl"))
    bench.questions = [
        _question("1", answer="2", category="count"),
        _question("2", answer="red circle", category="colour/shape"),
    ]
    score = bench.score({"1": "Two.", "2": "blue circle"})
    assert bench.key == "vqa_test set" and score["accuracy"] == 0.5
    assert bench.metrics(score) == {
        "vqa/test set/accuracy": 0.5,
        "vqa/test set/colour_shape/accuracy": 0.0,
        "vqa/test set/count/accuracy": 1.0,
        "vqa/test set/num_questions": 2,
        "vqa/test set/num_missing": 0,
    }
    assert VqaBenchmark.summary({"test set": score}) == {}


def test_registry_of_kinds():
    assert list(BENCHMARKS) == ["pope", "vqa"]
    assert {kind: cls.selection_key for kind, cls in BENCHMARKS.items()} == {
        "pope": "pope_splits",
        "vqa": "vqa_sets",
    }
