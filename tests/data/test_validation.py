"""Strict validation: every rejection reason is triggered by a crafted record, reported by id and reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from moe_llava.cli import main
from moe_llava.data.manifest import read_manifest, write_manifest
from moe_llava.data.prepare import prepare_manifest
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


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_report_and_quarantine_locate_records_by_index_in_json_by_line_in_jsonl(
    tmp_path, image_folder, suffix
):
    bad = [{"id": "no-placeholder", "image": "good.png", "conversations": conv("What?")}, {"id": "empty"}]
    path = tmp_path / f"one-line{suffix}"
    if suffix == ".json":  # the whole array on one line, as json.dump writes it
        path.write_text(json.dumps([GOOD[0], *bad]))
    else:
        path.write_text("".join(json.dumps(r) + "\n\n" for r in [GOOD[0], *bad]))  # records on lines 1, 3, 5
    where = ["record #1", "record #2"] if suffix == ".json" else ["line 3", "line 5"]
    text = validate_manifest(path, Validator(image_folder=image_folder)).format()
    assert f"no-placeholder ({where[0]}): image_placeholder_mismatch" in text
    assert f"empty ({where[1]}): malformed_record" in text
    result = prepare_manifest(
        path, tmp_path / "out", Validator(image_folder=image_folder), max_rejected_fraction=1
    )
    assert [q["location"] for q in read_manifest(result.quarantine)] == where
    assert read_manifest(result.manifest) == [GOOD[0]]  # the good record is kept


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


def test_bad_jpg_files_are_quarantined_by_name_and_good_records_kept(tmp_path, image_folder):
    """Corrupt, truncated and non-image files named .jpg: each rejected for its reason, naming the file."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    data = buffer.getvalue()
    scan = data.index(b"\xff\xda")  # start of the compressed pixel data
    files = {
        "photo.jpg": data,
        "corrupt.jpg": data[:scan] + bytes(len(data) - scan),  # valid header, pixel data zeroed
        "truncated.jpg": data[: len(data) // 2],
        "text.jpg": b"GIF? no: plain text\n",
        "empty.jpg": b"",
    }
    for name, content in files.items():
        (image_folder / name).write_bytes(content)
    records = [{"id": name, "image": name, "conversations": conv()} for name in files]
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, records)
    result = prepare_manifest(
        manifest, tmp_path / "out", Validator(image_folder=image_folder), max_rejected_fraction=1
    )
    assert read_manifest(result.manifest) == records[:1]
    quarantined = {q["id"]: q["issues"] for q in read_manifest(result.quarantine)}
    expected = {
        "corrupt.jpg": "unreadable_image",
        "truncated.jpg": "unreadable_image",
        "text.jpg": "not_an_image",
        "empty.jpg": "not_an_image",
    }
    assert {rid: [i["reason"] for i in issues] for rid, issues in quarantined.items()} == {
        rid: [reason] for rid, reason in expected.items()
    }
    for name, issues in quarantined.items():
        assert issues[0]["field"] == "image" and str(image_folder / name) in issues[0]["detail"]


def test_header_check_is_fast_but_misses_truncation(image_folder):
    record = {"id": "corrupt", "image": "corrupt.png", "conversations": conv()}
    assert Validator(image_folder=image_folder, image_check="header").check_record(record).ok
    assert not Validator(image_folder=image_folder, image_check="full").check_record(record).ok
