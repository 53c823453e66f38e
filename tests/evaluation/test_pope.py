"""POPE: the paper's answer normalisation, metrics on known confusion matrices, pairing by id, file errors."""

from __future__ import annotations

import json
import random

import pytest

from moe_llava.evaluation import (
    EvalFileError,
    PopeCounts,
    answers_by_id,
    mean_f1,
    pope_yes_no,
    read_answers,
    read_questions,
    score_pope,
)
from tests.evaluation.conftest import write_jsonl

SUFFIX = "Answer the question using a single word or phrase."


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("YES", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no", "no"),
        ("no, there is not", "no"),
        ("There is no red star", "no"),
        ("There is no red star in the image.", "no"),
        ("It is not there.", "no"),
        # Quirks of the official rule, kept so numbers stay comparable with published ones:
        ("Not really", "yes"),  # "Not" (capital N) is not one of No / not / no
        ("Nope", "yes"),  # another word
        ("", "yes"),  # an empty answer counts as yes
        ("NO", "yes"),  # case-sensitive: only "No" and "no"
        ("Yes, there is a red star, not a blue one", "no"),  # "not" anywhere in the first sentence
        ("Yes. There is no blue one.", "yes"),  # only the text before the first "." counts
        ("no,", "no"),  # commas are removed before splitting
        ("No\nthere is none", "yes"),  # split on spaces only: "No\nthere" is one word
    ],
)
def test_pope_normalisation_follows_the_paper(answer, expected):
    assert pope_yes_no(answer) == expected


def test_metrics_of_a_known_confusion_matrix():
    labels = ["yes"] * 5 + ["no"] * 3
    preds = ["yes", "yes", "yes", "no", "no", "yes", "no", "no"]  # TP 3, FN 2, FP 1, TN 2
    counts = PopeCounts.from_predictions(labels, preds)
    assert (counts.tp, counts.fn, counts.fp, counts.tn) == (3, 2, 1, 2)
    m = counts.metrics()
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_degenerate_answers_give_zero_not_nan():
    m = PopeCounts.from_predictions(["yes", "no"], ["no", "no"]).metrics()  # never says yes
    assert m == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert mean_f1(
        {"random": {"f1": 0.5}, "popular": {"f1": 0.7}, "adversarial": {"f1": 0.9}}
    ) == pytest.approx(0.7)


def pope_records(n_yes: int, n_no: int, *, conversations: bool = False):
    records = []
    for i in range(n_yes + n_no):
        label = "yes" if i < n_yes else "no"
        record = {
            "question_id": i,
            "image": f"img{i % 3}.jpg",
            "text": f"Is there a thing {i} in the image?",
            "label": label,
        }
        if conversations:
            record["conversations"] = [
                {"from": "human", "value": f"<image>\n{record['text']}"},
                {"from": "gpt", "value": label.capitalize()},
            ]
        records.append(record)
    return records


def test_answers_pair_by_id_whatever_their_order(tmp_path):
    questions = read_questions(write_jsonl(tmp_path / "q.jsonl", pope_records(4, 4)), kind="pope")
    # Answer ids 0-3 are yes questions: answer 0,1 yes; 2,3 no. ids 4-7 (no): 4 yes, 5-7 no.
    texts = {0: "Yes", 1: "Yes, it is", 2: "No", 3: "There is no thing", 4: "Yes", 5: "No", 6: "no", 7: "No."}
    records = [{"question_id": qid, "text": t, "answer_id": f"a{qid}"} for qid, t in texts.items()]
    random.Random(0).shuffle(records)
    answers = answers_by_id(read_answers(write_jsonl(tmp_path / "a.jsonl", records)))
    score = score_pope(questions, answers)
    assert (score["tp"], score["fn"], score["fp"], score["tn"]) == (2, 2, 1, 3)
    assert score["accuracy"] == pytest.approx(5 / 8)
    assert score["num_missing"] == 0 and score["num_unknown"] == 0


def test_missing_and_unknown_answers_are_reported(tmp_path):
    questions = read_questions(write_jsonl(tmp_path / "q.jsonl", pope_records(2, 2)), kind="pope")
    answers = {"0": "Yes", "3": "No", "99": "Yes"}
    score = score_pope(questions, answers)
    assert score["num_questions"] == 4 and score["num_answered"] == 2
    assert score["num_missing"] == 2 and score["missing_ids"] == ["1", "2"]
    assert score["num_unknown"] == 1 and score["unknown_ids"] == ["99"]
    assert score["accuracy"] == 1.0  # over the answered questions


def test_duplicate_question_and_answer_ids_name_file_line_and_id(tmp_path):
    records = pope_records(2, 1)
    records.append({**records[0], "text": "again"})
    path = write_jsonl(tmp_path / "dup_q.jsonl", records)
    with pytest.raises(
        EvalFileError,
        match=r"dup_q\.jsonl: line 4: field 'question_id': duplicate question_id '0' \(first on line 1\)",
    ):
        read_questions(path, kind="pope")
    answers = write_jsonl(
        tmp_path / "dup_a.jsonl",
        [
            {"question_id": 1, "text": "Yes"},
            {"question_id": 2, "text": "No"},
            {"question_id": "1", "text": "No"},
        ],
    )
    with pytest.raises(
        EvalFileError,
        match=r"dup_a\.jsonl: line 3: field 'question_id': duplicate answer for question_id '1' \(first on line 1\)",
    ):
        read_answers(answers)


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        (
            {"question_id": 7, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"},
            "label",
            "must be 'yes' or 'no'",
        ),
        ({"question_id": 7, "image": "a.jpg", "text": "Is there a cat?"}, "label", "no 'label'"),
        (
            {"question_id": None, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"},
            "question_id",
            "non-empty string or integer",
        ),
        ({"question_id": 7, "image": "a.jpg", "label": "yes"}, "text", "needs a non-empty 'text'"),
        (
            {"question_id": 7, "image": 3, "text": "Is there a cat?", "label": "yes"},
            "image",
            "must be a path",
        ),
        (
            {"question_id": 7, "conversations": [{"from": "gpt", "value": "Yes"}], "label": "yes"},
            "conversations[0].from",
            "first turn",
        ),
        (  # the conversation rules of training data (moe_llava.data.conversation)
            {"question_id": 7, "conversations": [{"from": "human", "value": "Cat?"}] * 2, "label": "yes"},
            "conversations[1].from",
            "question_id '7': turns must alternate human/gpt",
        ),
    ],
)
def test_bad_question_records_name_file_line_and_field(tmp_path, line, field, message):
    path = write_jsonl(tmp_path / "q.jsonl", [pope_records(1, 0)[0], line])
    with pytest.raises(EvalFileError) as err:
        read_questions(path, kind="pope")
    text = str(err.value)
    assert text.startswith(f"{path}: line 2: field '{field}': ")
    assert message in text


def test_json_array_question_and_answer_files_name_the_record_index(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([*pope_records(1, 1), {"question_id": 7, "text": "Cat?", "label": "maybe"}]))
    with pytest.raises(EvalFileError) as err:
        read_questions(path, kind="pope")
    assert str(err.value).startswith(f"{path}: record #2: field 'label': question_id '7'")
    answers = tmp_path / "a.json"
    answers.write_text(json.dumps([{"question_id": 1, "text": "Yes"}, {"question_id": 1, "text": "No"}]))
    with pytest.raises(
        EvalFileError, match=r"a\.json: record #1: field 'question_id': .* \(first on record #0\)"
    ):
        read_answers(answers)


def test_invalid_json_and_bad_answers_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": \n')
    with pytest.raises(EvalFileError, match=r"a\.jsonl: line 2: invalid JSON"):
        read_answers(path)
    write_jsonl(path, [{"question_id": 1, "text": None}])
    with pytest.raises(EvalFileError, match=r"line 1: field 'text': question_id '1': text must be a string"):
        read_answers(path)


def test_public_pope_records_become_one_turn_prompts(tmp_path):
    """The official COCO POPE format (no conversations): the prompt is built from `text`, with the
    paper's suffix only when asked for; files with conversations are used as they are."""
    official = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000310196.jpg",
            "text": "Is there a snowboard in the image?",
            "label": "yes",
        }
    ]
    path = write_jsonl(tmp_path / "coco_pope_random.json", official)
    (plain,) = read_questions(path, kind="pope")
    assert plain.question_id == "1" and plain.label == "yes"
    assert plain.record == {
        "id": "1",
        "image": "COCO_val2014_000000310196.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs there a snowboard in the image?"}],
    }
    (suffixed,) = read_questions(path, kind="pope", prompt_suffix=SUFFIX)
    assert (
        suffixed.record["conversations"][0]["value"]
        == f"<image>\nIs there a snowboard in the image?\n{SUFFIX}"
    )
    assert suffixed.text.endswith(SUFFIX)

    with_conv = write_jsonl(tmp_path / "sw.jsonl", pope_records(1, 1, conversations=True))
    questions = read_questions(with_conv, kind="pope", prompt_suffix=SUFFIX, limit=1)
    assert len(questions) == 1
    assert questions[0].record["conversations"][0]["value"] == "<image>\nIs there a thing 0 in the image?"
