"""LLaVA-format manifests: streaming reading and writing.

A manifest is either a JSON array of records (the LLaVA release format) or JSON Lines (one record
per line). Records look like::

    {"id": "000123", "image": "train/000123.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A red circle."}]}

``image`` is relative to an image folder and absent for text-only records (a list of paths is
accepted for multi-image records). Both formats are *streamed*: the JSON array is decoded one record
at a time from a bounded text buffer, so a 665k-record (1 GB) file never sits in memory as text and
as Python objects at the same time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from moe_llava.errors import ManifestError

_CHUNK_CHARS = 1 << 20  # text read per refill of the streaming decoder
_WHITESPACE = " \t\n\r"


@dataclass
class ManifestEntry:
    """One entry of a manifest: a parsed record, or the reason it could not be parsed.

    ``error`` is only ever set for JSON Lines files, where one bad line does not prevent reading the
    next one; a syntax error inside a JSON array is fatal (``ManifestError``) because the decoder
    cannot resynchronise.
    """

    index: int  # 0-based position in the manifest
    line: int  # 1-based line where the record starts
    record: Any = None
    error: str | None = None
    in_array: bool = False  # read from a JSON array (located by index) rather than JSON Lines

    @property
    def location(self) -> str:
        """Where the record is, for messages: ``line N`` in JSON Lines, ``record #i`` (0-based) in a
        JSON array, where a line number says little (a one-line file has every record on line 1)."""
        return f"record #{self.index}" if self.in_array else f"line {self.line}"


def manifest_format(path: str | Path) -> str:
    """``"json"`` (array) or ``"jsonl"``, sniffed from the first non-blank character."""
    with open(path, encoding="utf-8") as fh:
        while True:
            ch = fh.read(1)
            if not ch:
                return "json"  # empty file: treated as an empty array by the readers
            if ch == "\ufeff" or ch in _WHITESPACE:
                continue
            return "json" if ch == "[" else "jsonl"


def iter_entries(path: str | Path) -> Iterator[ManifestEntry]:
    """Stream the entries of a JSON or JSONL manifest (see :class:`ManifestEntry`)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest file not found", file=path)
    if manifest_format(path) == "json":
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


def iter_manifest(path: str | Path) -> Iterator[dict]:
    """Stream the records of a manifest; raises :class:`ManifestError` on any unparseable entry."""
    for entry in iter_entries(path):
        line = "" if entry.in_array else f"line {entry.line}: "  # the record index is in the prefix
        if entry.error is not None:
            raise ManifestError(f"{line}{entry.error}", file=path, record=entry.index)
        if not isinstance(entry.record, dict):
            raise ManifestError(
                f"{line}a record must be a JSON object, got {type(entry.record).__name__}",
                file=path,
                record=entry.index,
            )
        yield entry.record


def read_manifest(path: str | Path) -> list[dict]:
    """All records of a manifest as a list (small files; prefer :func:`iter_manifest`)."""
    return list(iter_manifest(path))


def _iter_jsonl(path: Path) -> Iterator[ManifestEntry]:
    with open(path, encoding="utf-8-sig") as fh:
        index = 0
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield ManifestEntry(index, lineno, None, f"invalid JSON: {err.msg} (column {err.colno})")
            else:
                yield ManifestEntry(index, lineno, record)
            index += 1


def _iter_json_array(path: Path) -> Iterator[ManifestEntry]:
    """Incremental decoder for ``[ {...}, {...} ]`` holding only a bounded window of the text."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as fh:
        buf = ""
        pos = 0
        line = 1  # line number at buf[pos]
        eof = False

        def refill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = fh.read(_CHUNK_CHARS)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws() -> str | None:
            """Advance over whitespace; the next character, or None at end of file."""
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not refill():
                    return None

        def fail(message: str, index: int | None = None) -> ManifestError:
            return ManifestError(f"line {line}: {message}", file=path, record=index)

        ch = skip_ws()
        if ch is None:
            return
        if ch != "[":
            raise fail("a JSON manifest must be an array of records")
        pos += 1
        index = 0
        expect_value = True  # right after '[' or ','
        while True:
            ch = skip_ws()
            if ch is None:
                raise fail("unexpected end of file inside the top-level array", index)
            if ch == "]":
                if expect_value and index > 0:
                    raise fail("trailing comma before ']'", index)
                pos += 1
                if skip_ws() is not None:
                    raise fail("unexpected content after the top-level array")
                return
            if ch == ",":
                if expect_value:
                    raise fail("unexpected ','", index)
                pos += 1
                expect_value = True
                continue
            if not expect_value:
                raise fail("expected ',' or ']' between records", index)
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and refill():
                        continue  # a bare number may continue in the next chunk: decode again
                    break
                except json.JSONDecodeError as err:
                    # Possibly an incomplete record at the end of the window: read more and retry.
                    if not refill():
                        raise fail(f"invalid JSON: {err.msg}", index) from None
            start_line = line
            line += buf.count("\n", pos, end)
            pos = end
            yield ManifestEntry(index, start_line, record, in_array=True)
            index += 1
            expect_value = False
            if pos > _CHUNK_CHARS:  # drop consumed text so the window stays bounded
                buf = buf[pos:]
                pos = 0


def as_llava_record(record: Any) -> Any:
    """Question files (POPE / LLaVA eval: ``question_id``, ``image``, ``text``) -> a LLaVA record.

    Records that already have ``conversations`` are returned unchanged. The ``<image>`` placeholder is
    put first (the LLaVA convention); ``id`` defaults to ``question_id``.
    """
    if not isinstance(record, dict) or "conversations" in record or "text" not in record:
        return record
    from moe_llava.constants import IMAGE_TOKEN

    text = str(record["text"])
    if record.get("image") is not None and IMAGE_TOKEN not in text:
        text = f"{IMAGE_TOKEN}\n{text}"
    out = {**record, "conversations": [{"from": "human", "value": text}]}
    out.setdefault("id", record.get("question_id"))
    return out


class ManifestWriter:
    """Stream records into a manifest; the format follows the suffix (``.jsonl`` or JSON array).

    The JSON array is written one record per line, so it is valid JSON *and* diff/grep friendly.
    The file is written to a temporary name and moved into place on successful close, so readers never
    see a half-written manifest.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.jsonl = self.path.suffix == ".jsonl"
        self.count = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh: TextIO | None = None

    def __enter__(self) -> ManifestWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._tmp, "w", encoding="utf-8", newline="\n")
        if not self.jsonl:
            self._fh.write("[")
        return self

    def write(self, record: Any) -> None:
        assert self._fh is not None, "use ManifestWriter as a context manager"
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if self.jsonl:
            self._fh.write(text + "\n")
        else:
            self._fh.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def write_all(self, records: Iterable[Any]) -> None:
        for record in records:
            self.write(record)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._fh is not None
        if not self.jsonl:
            self._fh.write("\n]\n")
        self._fh.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_manifest(path: str | Path, records: Iterable[Any]) -> int:
    """Write records to ``path`` (format by suffix); returns the number written."""
    with ManifestWriter(path) as writer:
        writer.write_all(records)
    return writer.count
