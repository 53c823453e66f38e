"""Streaming LLaVA manifests: JSON arrays decoded record by record, JSONL line by line."""

from __future__ import annotations

import json

import pytest

from moe_llava.data import manifest as manifest_mod
from moe_llava.data.manifest import (
    ManifestWriter,
    as_llava_record,
    iter_entries,
    iter_manifest,
    manifest_format,
    read_manifest,
    write_manifest,
)
from moe_llava.errors import ManifestError

RECORDS = [
    {
        "id": f"r{i}",
        "image": f"{i}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQ é " + "x" * i},
            {"from": "gpt", "value": "A"},
        ],
    }
    for i in range(40)
] + [
    {
        "id": "text",
        "conversations": [{"from": "human", "value": '[1, 2] {"a": "]"}'}, {"from": "gpt", "value": "ok"}],
    }
]


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_streams_identically_with_tiny_buffers(tmp_path, monkeypatch, indent):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(RECORDS, indent=indent, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(manifest_mod, "_CHUNK_CHARS", 7)  # force many refills mid-record
    assert manifest_format(path) == "json"
    assert list(iter_manifest(path)) == RECORDS
    entries = list(iter_entries(path))
    assert [e.index for e in entries] == list(range(len(RECORDS)))
    if indent:  # line numbers point at each record's first line
        lines = path.read_text(encoding="utf-8").splitlines()
        assert all(lines[e.line - 1].strip() == "{" for e in entries)


def test_json_array_window_stays_bounded(tmp_path, monkeypatch):
    """The decoder drops consumed text: its buffer never holds more than ~2 chunks + one record."""
    path = tmp_path / "m.json"
    write_manifest(path, RECORDS * 20)
    monkeypatch.setattr(manifest_mod, "_CHUNK_CHARS", 256)
    sizes = []
    real_decode = json.JSONDecoder.raw_decode

    def spy(self, s, idx=0):
        sizes.append(len(s))
        return real_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", spy)
    assert sum(1 for _ in iter_manifest(path)) == len(RECORDS) * 20
    assert max(sizes) < 3 * 256 + 400 < path.stat().st_size


def test_jsonl_bad_line_is_an_entry_error_not_a_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "conversations": []}\n\n{"id": "b", oops}\n{"id": "c", "conversations": []}\n'
    )
    entries = list(iter_entries(path))
    assert [e.line for e in entries] == [1, 3, 4]
    assert entries[1].record is None and "invalid JSON" in entries[1].error
    with pytest.raises(ManifestError, match=r"m\.jsonl: record #1: line 3: invalid JSON"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"id": "a"}, {"id": "b" "x"}]', "invalid JSON"),
        ('[{"id": "a"} {"id": "b"}]', "expected ',' or ']'"),
        ('[{"id": "a"},]', "trailing comma"),
        ('[{"id": "a"}', "unexpected end of file"),
        ('{"id": "a"} x', "invalid JSON"),
        ('[{"id": "a"}] [', "unexpected content after"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_malformed_json_names_file_record_and_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message) as err:
        list(iter_manifest(path))
    assert "bad.json" in str(err.value)


def test_json_array_records_are_located_by_index_jsonl_records_by_line(tmp_path):
    """A one-line JSON array has every record on line 1: messages name the record index instead."""
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps([{"id": "a"}, {"id": "b"}, 7]))
    assert [e.location for e in iter_entries(one_line)] == ["record #0", "record #1", "record #2"]
    with pytest.raises(ManifestError) as err:
        list(iter_manifest(one_line))
    assert str(err.value) == f"{one_line}: record #2: a record must be a JSON object, got int"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"id": "a"}\n\n7\n')
    assert [e.location for e in iter_entries(jsonl)] == ["line 1", "line 3"]
    with pytest.raises(ManifestError) as err:
        list(iter_manifest(jsonl))
    assert str(err.value) == f"{jsonl}: record #1: line 3: a record must be a JSON object, got int"


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        list(iter_manifest(tmp_path / "nope.json"))
    (tmp_path / "empty.json").write_text("  \n")
    assert list(iter_manifest(tmp_path / "empty.json")) == []
    (tmp_path / "empty_array.json").write_text("[ ]")
    assert list(iter_manifest(tmp_path / "empty_array.json")) == []


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_writer_round_trip_and_atomicity(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    assert write_manifest(path, RECORDS) == len(RECORDS)
    assert read_manifest(path) == RECORDS
    assert manifest_format(path) == ("json" if suffix == ".json" else "jsonl")
    if suffix == ".json":
        assert json.loads(path.read_text(encoding="utf-8")) == RECORDS
    with pytest.raises(RuntimeError), ManifestWriter(tmp_path / f"broken{suffix}") as writer:
        writer.write({"id": 1})
        raise RuntimeError("crash mid-write")
    assert not (tmp_path / f"broken{suffix}").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_question_records_become_llava_records():
    pope = {"question_id": "q1", "image": "a.png", "text": "Is there a cat?", "label": "yes"}
    record = as_llava_record(pope)
    assert record["id"] == "q1"
    assert record["conversations"] == [{"from": "human", "value": "<image>\nIs there a cat?"}]
    already = {"id": "x", "conversations": []}
    assert as_llava_record(already) is already
