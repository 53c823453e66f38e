"""Strict validation: every rejection reason is triggered by a crafted record, reported by id and reason."""

from __future__ import annotations

import json

import pytest

from moe_llava.cli import main
from moe_llava.data.manifest import write_manifest
from moe_llava.data.templates import get_template
from moe_llava.data.validation import REASONS, Reason, Validator, validate_manifest


def conv(question="<image>\nWhat is it?", answer="A red circle."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = [
    {"id": "good-image", "image": "good.png", "conversations": conv()},
    {"id": "good-sub", "image": "sub/ok.png", "conversations": conv()},
    {"id": "good-text", "conversations": conv("What is 2 plus 2?", "4.")},
    {
        "id": 7,
        "image": ["good.png", "square.png"],
        "conversations": conv("<image> and <image>: same?", "No."),
    },
    {"id": "good-multi", "image": "square.png", "conversations": [*conv(), *conv("And now?", "Still red.")]},
]

# (record, expected reason); token checks use the phi template with max_length 64 unless noted
BAD = [
    ({"id": "no-conv", "image": "good.png"}, Reason.MALFORMED_RECORD),
    ({"image": "good.png", "conversations": conv()}, Reason.MALFORMED_RECORD),  # no id
    (
        {
            "id": "bad-role",
            "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}],
        },
        Reason.MALFORMED_RECORD,
    ),
    (
        {"id": "bad-value", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
        Reason.MALFORMED_RECORD,
    ),
    ({"id": "bad-image-field", "image": 5, "conversations": conv()}, Reason.MALFORMED_RECORD),
    ({"id": "missing", "image": "nope.png", "conversations": conv()}, Reason.MISSING_IMAGE),
    ({"id": "corrupt", "image": "corrupt.png", "conversations": conv()}, Reason.UNREADABLE_IMAGE),
    ({"id": "directory", "image": "sub", "conversations": conv()}, Reason.UNREADABLE_IMAGE),
    ({"id": "text-file", "image": "notes.png", "conversations": conv()}, Reason.NOT_AN_IMAGE),
    ({"id": "absolute", "image": "/etc/passwd", "conversations": conv()}, Reason.UNSAFE_IMAGE_PATH),
    ({"id": "dotdot", "image": "sub/../../outside.png", "conversations": conv()}, Reason.UNSAFE_IMAGE_PATH),
    ({"id": "symlink", "image": "link.png", "conversations": conv()}, Reason.UNSAFE_IMAGE_PATH),
    ({"id": "big", "image": "big.png", "conversations": conv()}, Reason.OVERSIZED_IMAGE),
    ({"id": "empty", "conversations": []}, Reason.EMPTY_CONVERSATION),
    ({"id": "gpt-first", "conversations": conv("Q?", "A.")[::-1]}, Reason.NOT_STARTING_WITH_HUMAN),
    ({"id": "two-humans", "conversations": [conv("Q?")[0], *conv("Q?")]}, Reason.NOT_ALTERNATING),
    (
        {"id": "unanswered", "conversations": [*conv("hi", "hello"), {"from": "human", "value": "and?"}]},
        Reason.NOT_ALTERNATING,
    ),
    (
        {"id": "no-placeholder", "image": "good.png", "conversations": conv("What is it?")},
        Reason.IMAGE_PLACEHOLDER_MISMATCH,
    ),
    ({"id": "extra-placeholder", "conversations": conv()}, Reason.IMAGE_PLACEHOLDER_MISMATCH),
    (
        {"id": "image-in-answer", "image": "good.png", "conversations": conv(answer="<image> here")},
        Reason.IMAGE_PLACEHOLDER_MISMATCH,
    ),
    ({"id": "empty-answer", "image": "good.png", "conversations": conv(answer="  \n")}, Reason.EMPTY_ANSWER),
    (
        {"id": "too-long", "image": "good.png", "conversations": conv(answer="very " * 120 + "long.")},
        Reason.TOO_LONG,
    ),
]


@pytest.fixture
def validator(image_folder, sw_tokenizer):
    return Validator(
        image_folder=image_folder,
        tokenizer=sw_tokenizer,
        template="phi",
        max_length=128,
        num_image_tokens=4,
        max_image_pixels=100 * 100,
    )


def test_good_records_pass(validator):
    for i, record in enumerate(GOOD):
        check = validator.check_record(record, i)
        assert check.ok, (record["id"], check.issues)
        assert check.num_tokens is not None and check.num_tokens <= 128


@pytest.mark.parametrize(("record", "reason"), BAD, ids=[str(r.get("id", "no-id")) for r, _ in BAD])
def test_each_bad_record_is_rejected_for_its_reason(validator, record, reason):
    check = validator.check_record(record, 3)
    assert check.reasons == [reason.value], check.issues
    assert all(issue.detail for issue in check.issues)


def test_template_mismatch_and_fully_masked(image_folder, sw_tokenizer):
    plain = Validator(image_folder=image_folder, tokenizer=sw_tokenizer, template="plain", num_image_tokens=4)
    multi = {"id": "multi", "image": "good.png", "conversations": [*conv(), *conv("More?", "No.")]}
    assert plain.check_record(multi).reasons == [Reason.TEMPLATE_MISMATCH.value]
    # truncation that would cut every answer token away: the whole sample would be masked (loss 0)
    record = {"id": "cut", "image": "good.png", "conversations": conv()}
    sample = get_template("phi").encode(record["conversations"], sw_tokenizer, num_image_tokens=4)
    first_answer = next(i for i, label in enumerate(sample.labels) if label >= 0)
    truncating = Validator(
        image_folder=image_folder,
        tokenizer=sw_tokenizer,
        template="phi",
        num_image_tokens=4,
        max_length=first_answer,
        overlength="truncate",
    )
    assert truncating.check_record(record).reasons == [Reason.FULLY_MASKED.value]
    # truncation keeping part of the answer is fine; cutting into the image tokens is not
    truncating.max_length = first_answer + 2
    assert truncating.check_record(record).ok
    truncating.max_length = 3
    assert truncating.check_record(record).reasons == [Reason.TOO_LONG.value]


def test_every_reason_is_covered_by_a_test():
    covered = {reason.value for _, reason in BAD} | {
        "template_mismatch",
        "fully_masked",
        "malformed_json",
        "duplicate_id",
    }
    assert covered == set(REASONS)


def _write_mixed_manifest(path):
    records = (
        GOOD + [record for record, _ in BAD] + [{"id": "good-image", "conversations": conv("dup?", "yes")}]
    )
    write_manifest(path, records)
    with path.open("a") as fh:
        fh.write('{"id": "broken", \n')  # a JSONL line that is not JSON
    return records


def test_validate_manifest_report(tmp_path, validator):
    path = tmp_path / "mixed.jsonl"
    _write_mixed_manifest(path)
    report = validate_manifest(path, validator, workers=3)
    assert report.total == len(GOOD) + len(BAD) + 2
    assert report.num_invalid == len(BAD) + 2
    expected = {r.value for _, r in BAD} | {"duplicate_id", "malformed_json"}
    assert set(report.counts) == expected
    assert report.counts["unsafe_image_path"] == 3 and report.counts["duplicate_id"] == 1
    text = report.format()
    for record, reason in BAD:
        if "id" in record:
            assert f"{record['id']} (line" in text
        assert reason.value in text
    assert f"summary: {report.total} record(s), {len(GOOD)} valid, {len(BAD) + 2} invalid" in text


def test_cli_validate_exit_status_and_report(tmp_path, image_folder, bos_tokenizer, capsys):
    path = tmp_path / "mixed.jsonl"
    _write_mixed_manifest(path)
    tok_dir = tmp_path / "tok"
    bos_tokenizer.save_pretrained(str(tok_dir))
    args = ["data", "validate", str(path), "--image-folder", str(image_folder), "--tokenizer", str(tok_dir)]
    args += ["--max-length", "256", "--num-image-tokens", "4", "--max-image-pixels", "10000", "--no-progress"]
    assert main([*args, "--report-json", str(tmp_path / "report.json")]) == 1
    out = capsys.readouterr().out
    assert "missing (line" in out and "missing_image" in out and "summary:" in out
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["invalid"] == len(BAD) + 2 and summary["reasons"]["not_an_image"] == 1
    clean = tmp_path / "clean.json"
    write_manifest(clean, GOOD)
    assert main(["data", "validate", str(clean), "--image-folder", str(image_folder), "--no-progress"]) == 0
    assert "0 invalid" in capsys.readouterr().out


def test_header_check_is_fast_but_misses_truncation(image_folder):
    record = {"id": "corrupt", "image": "corrupt.png", "conversations": conv()}
    assert Validator(image_folder=image_folder, image_check="header").check_record(record).ok
    assert not Validator(image_folder=image_folder, image_check="full").check_record(record).ok
