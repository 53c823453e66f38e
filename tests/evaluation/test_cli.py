"""`moe-llava eval pope-score / vqa-score`: metrics as JSON, unpaired ids reported, bad files named."""

from __future__ import annotations

import json

import pytest

from moe_llava.cli import main
from tests.evaluation.conftest import write_jsonl


@pytest.fixture
def pope_files(tmp_path):
    questions = [
        {"question_id": i, "image": f"{i}.jpg", "text": f"Is there a thing {i}?", "label": label}
        for i, label in enumerate(["yes", "yes", "no", "no", "yes"])
    ]
    answers = [
        {"question_id": 3, "text": "No, there is not."},
        {"question_id": 0, "text": "Yes"},
        {"question_id": 2, "text": "Yes"},
        {"question_id": 1, "text": "There is no thing."},
        {"question_id": 42, "text": "Yes"},
    ]
    return write_jsonl(tmp_path / "q.jsonl", questions), write_jsonl(tmp_path / "a.jsonl", answers)


def test_pope_score_prints_metrics_and_lists_unpaired_ids(pope_files, capsys):
    questions, answers = pope_files
    assert main(["eval", "pope-score", "--questions", str(questions), "--answers", str(answers)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # answered: 0 yes->yes (TP), 1 yes->no (FN), 2 no->yes (FP), 3 no->no (TN); 4 is unanswered
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (1, 1, 1, 1)
    assert result["accuracy"] == 0.5 and result["precision"] == 0.5 and result["recall"] == 0.5
    assert result["f1"] == 0.5 and result["yes_ratio"] == 0.5
    assert result["num_missing"] == 1 and result["missing_ids"] == ["4"]
    assert result["num_unknown"] == 1 and result["unknown_ids"] == ["42"]
    assert "1 question(s)" in captured.err and "have no answer" in captured.err and ": 4" in captured.err
    assert "question ids not in" in captured.err and "42" in captured.err


def test_pope_score_duplicate_answer_is_an_error_naming_file_line_and_id(pope_files, capsys):
    questions, answers = pope_files
    with answers.open("a") as fh:
        fh.write(json.dumps({"question_id": "0", "text": "No"}) + "\n")
    assert main(["eval", "pope-score", "--questions", str(questions), "--answers", str(answers)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{answers}: line 6: field 'question_id': duplicate answer for question_id '0' (first on line 2)"
        in err
    )


def test_vqa_score(tmp_path, capsys):
    questions = write_jsonl(
        tmp_path / "vqa.jsonl",
        [
            {"question_id": "a", "image": "x.png", "text": "How many?", "answer": "3", "category": "count"},
            {"question_id": "b", "image": "x.png", "text": "Colour?", "answer": "Red", "category": "colour"},
        ],
    )
    answers = write_jsonl(
        tmp_path / "ans.jsonl", [{"question_id": "b", "text": "red."}, {"question_id": "a", "text": "Three"}]
    )
    assert main(["eval", "vqa-score", "--questions", str(questions), "--answers", str(answers)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0
    assert result["categories"]["count"] == {"accuracy": 1.0, "num_questions": 1, "num_correct": 1}
