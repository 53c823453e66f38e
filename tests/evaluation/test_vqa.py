"""Short-answer VQA: normalisation, exact-match accuracy overall and per category, reference answers."""

from __future__ import annotations

import pytest

from moe_llava.evaluation import EvalFileError, normalize_answer, read_questions, score_vqa
from tests.evaluation.conftest import write_jsonl


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("Two.", "2"),
        ("two", "2"),
        ("There are three.", "there are 3"),
        ("none", "0"),
        ("The red circle.", "red circle"),
        ("a Star", "star"),
        ("Top-left", "top left"),
        ("top left, mostly. The rest is empty", "top left mostly"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("It's blue!", "its blue"),
        ("  Bottom   right  ", "bottom right"),
        ("", ""),
    ],
)
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def vqa_records():
    return [
        {
            "question_id": "c1",
            "image": "a.png",
            "text": "How many stars?",
            "answer": "2",
            "category": "count",
        },
        {
            "question_id": "c2",
            "image": "a.png",
            "text": "How many circles?",
            "answer": "0",
            "category": "count",
        },
        {
            "question_id": "s1",
            "image": "b.png",
            "text": "What shape is it?",
            "answer": "Circle",
            "category": "shape",
        },
        # reference from the final gpt turn (LLaVA format), no category
        {
            "id": "x1",
            "image": "b.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": "Red"},
            ],
        },
    ]


def test_accuracy_overall_and_per_category(tmp_path):
    questions = read_questions(write_jsonl(tmp_path / "vqa.jsonl", vqa_records()), kind="vqa")
    assert [q.answer for q in questions] == ["2", "0", "Circle", "Red"]
    answers = {"x1": "red.", "s1": "A circle", "c2": "Zero", "c1": "3"}  # any order: paired by id
    score = score_vqa(questions, answers)
    assert score["accuracy"] == pytest.approx(3 / 4) and score["num_correct"] == 3
    assert score["categories"] == {
        "count": {"accuracy": 0.5, "num_questions": 2, "num_correct": 1},
        "none": {"accuracy": 1.0, "num_questions": 1, "num_correct": 1},
        "shape": {"accuracy": 1.0, "num_questions": 1, "num_correct": 1},
    }
    partial = score_vqa(questions, {"c1": "2", "zz": "2"})
    assert partial["missing_ids"] == ["c2", "s1", "x1"] and partial["unknown_ids"] == ["zz"]
    assert partial["accuracy"] == 1.0


def test_a_question_without_reference_is_an_error(tmp_path):
    records = vqa_records()
    records[2] = {"question_id": "s1", "image": "b.png", "text": "What shape is it?"}
    path = write_jsonl(tmp_path / "vqa.jsonl", records)
    with pytest.raises(
        EvalFileError, match=r"vqa\.jsonl: line 3: field 'answer': question_id 's1': no reference answer"
    ):
        read_questions(path, kind="vqa")
    assert len(read_questions(path)) == 4  # generation alone needs no reference
