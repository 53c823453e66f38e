"""Strict, per-record validation of LLaVA-format manifests.

Every record is checked completely and gets a list of :class:`Issue` (reason code, field, detail);
a record is valid when that list is empty. The reason codes (:class:`Reason`) are stable strings
used in reports, quarantine files and counts. The conversation's rules (roles, order, ``<image>``
placement) are :mod:`moe_llava.data.conversation`'s, the same that templates and question files use.

Token-level checks (``too_long``, ``fully_masked``, ``template_mismatch``) run only when a
tokenizer and a template are configured, because they depend on the model.

Two policies repair a record instead of rejecting it, as the reference implementation does; each
repair is named (:class:`Fix`) and counted, and the repaired record is what preparation keeps:

* ``leading_gpt: drop``: a conversation whose first turn is the assistant's loses that turn (the
  reference skips it); ``reject`` quarantines it (``not_starting_with_human``);
* ``overlength: truncate_turns``: an over-long conversation keeps its longest prefix of whole
  exchanges (question and answer) that fits in ``max_length``, so it is cut at the end of a turn;
  ``truncate`` cuts the token tail (possibly inside an answer, never into image tokens); ``reject``
  quarantines it (``too_long``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data import conversation
from moe_llava.data.conversation import GPT, conversation_issues, role_of
from moe_llava.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageIssue, open_image, resolve_image_path
from moe_llava.data.manifest import ManifestEntry, iter_entries
from moe_llava.data.templates import ConversationTemplate, TokenizedSample, get_template, image_token_id_of
from moe_llava.errors import TemplateError


class Reason(StrEnum):
    """Why a record is rejected."""

    MALFORMED_JSON = "malformed_json"  # a JSONL line that is not valid JSON
    MALFORMED_RECORD = (
        conversation.MALFORMED_RECORD
    )  # missing/ill-typed id, image, conversations, from, value
    DUPLICATE_ID = "duplicate_id"  # ids must be unique (evaluation pairs answers by id)
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"  # corrupt, truncated, or not a readable file
    NOT_AN_IMAGE = "not_an_image"  # a file Pillow does not recognise as an image
    UNSAFE_IMAGE_PATH = "unsafe_image_path"  # absolute, '..', or a symlink out of the image folder
    OVERSIZED_IMAGE = "oversized_image"  # more pixels than the decompression-bomb guard allows
    EMPTY_CONVERSATION = conversation.EMPTY_CONVERSATION
    NOT_STARTING_WITH_HUMAN = conversation.NOT_STARTING_WITH_HUMAN
    NOT_ALTERNATING = conversation.NOT_ALTERNATING  # includes a trailing unanswered human turn
    # <image> count != number of images, or an <image> in an answer
    IMAGE_PLACEHOLDER_MISMATCH = conversation.IMAGE_PLACEHOLDER_MISMATCH
    EMPTY_ANSWER = conversation.EMPTY_ANSWER
    TEMPLATE_MISMATCH = "template_mismatch"  # e.g. a multi-turn record under the `plain` template
    TOO_LONG = "too_long"  # longer than max_length tokens (image tokens included)
    FULLY_MASKED = "fully_masked"  # no answer token would be supervised (loss would be 0)

    def __str__(self) -> str:
        return self.value


class Fix(StrEnum):
    """How a record was repaired (``leading_gpt: drop``, ``overlength: truncate_turns``)."""

    DROPPED_LEADING_GPT = "dropped_leading_gpt"  # the first (assistant) turn removed
    TRUNCATED_TURNS = "truncated_turns"  # the exchanges after the last one that fits removed

    def __str__(self) -> str:
        return self.value


REASONS: tuple[str, ...] = tuple(r.value for r in Reason)
FIXES: tuple[str, ...] = tuple(f.value for f in Fix)
OVERLENGTH_POLICIES = ("reject", "truncate", "truncate_turns")
LEADING_GPT_POLICIES = ("reject", "drop")
IMAGE_CHECKS = ("full", "header", "exists", "none")


@dataclass
class Issue:
    reason: str
    field: str | None
    detail: str

    def to_dict(self) -> dict:
        return {"reason": self.reason, "field": self.field, "detail": self.detail}


@dataclass
class RecordCheck:
    """The outcome of checking one record."""

    index: int
    line: int
    id: str | None
    issues: list[Issue] = field(default_factory=list)
    num_tokens: int | None = None
    location: str = ""  # for messages: "line N" (JSON Lines) or "record #i" (JSON array)
    fixes: list[str] = field(default_factory=list)  # repairs applied (Fix), in order
    record: dict | None = None  # the repaired record (None: the record is kept as it is)

    def __post_init__(self) -> None:
        self.location = self.location or (f"line {self.line}" if self.line else f"record #{self.index}")

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def reasons(self) -> list[str]:
        return list(dict.fromkeys(issue.reason for issue in self.issues))

    def add(self, reason: Reason | str, field_name: str | None, detail: str) -> None:
        self.issues.append(Issue(str(reason), field_name, detail))


def record_images(record: dict) -> list[Any]:
    """The record's image paths as a list (``[]`` for text-only records)."""
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def fit_to_length(
    sample: TokenizedSample, max_length: int | None, overlength: str, image_token_id: int | None
) -> tuple[TokenizedSample | None, str | None]:
    """Apply the overlength policy to a tokenized sample. Returns ``(sample, None)`` or ``(None, reason)``.

    ``truncate`` cuts the tail but never inside or before an image's tokens (the model needs all of
    them); a truncation that leaves no supervised answer token is ``fully_masked``.
    ``truncate_turns`` works on the record (:meth:`Validator.check_record`, in data preparation):
    a sample still too long here is ``too_long``.
    """
    if max_length is None or len(sample) <= max_length:
        return sample, None
    if overlength in ("reject", "truncate_turns"):
        return None, Reason.TOO_LONG.value
    ids, labels = sample.input_ids[:max_length], sample.labels[:max_length]
    if image_token_id is not None and sample.input_ids[max_length:].count(image_token_id):
        return None, Reason.TOO_LONG.value
    return TokenizedSample(ids, labels, sample.num_images), None


def answer_token_count(sample: TokenizedSample, eos_token_id: int | None) -> int:
    """Supervised tokens that are not the end-of-turn token (the content the model learns)."""
    return sum(1 for label in sample.labels if label >= 0 and label != eos_token_id)


@dataclass
class Validator:
    """Checks records. Configure the token-level checks with ``tokenizer`` + ``template``.

    ``image_check``: ``full`` decodes every image (catches truncated files), ``header`` reads only
    headers (fast), ``exists`` only checks files exist, ``none`` only checks paths lexically (no I/O).
    """

    image_folder: str | Path | None = None
    tokenizer: Any = None
    template: str | ConversationTemplate | None = None
    max_length: int | None = None
    num_image_tokens: int = 1
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    image_check: str = "full"
    overlength: str = "reject"
    leading_gpt: str = "reject"

    def __post_init__(self) -> None:
        if self.image_check not in IMAGE_CHECKS:
            raise ValueError(f"image_check must be one of {IMAGE_CHECKS}, got {self.image_check!r}")
        if self.overlength not in OVERLENGTH_POLICIES:
            raise ValueError(f"overlength must be one of {OVERLENGTH_POLICIES}, got {self.overlength!r}")
        if self.leading_gpt not in LEADING_GPT_POLICIES:
            raise ValueError(f"leading_gpt must be one of {LEADING_GPT_POLICIES}, got {self.leading_gpt!r}")
        if self.template is not None:
            self.template = get_template(self.template)
        self._image_token_id = None
        if self.tokenizer is not None:
            self._image_token_id = image_token_id_of(self.tokenizer)

    @property
    def checks_tokens(self) -> bool:
        return self.tokenizer is not None and self.template is not None

    def settings(self) -> dict[str, Any]:
        """What decides the verdicts (JSON-able): recorded in counts.json, compared before re-preparing."""
        tokenizer = self.tokenizer
        return {
            "image_folder": None if self.image_folder is None else str(self.image_folder),
            "template": getattr(self.template, "name", None),
            "tokenizer": None
            if tokenizer is None
            else f"{getattr(tokenizer, 'name_or_path', '?')} ({len(tokenizer)} tokens)",
            "max_length": self.max_length,
            "num_image_tokens": self.num_image_tokens,
            "max_image_pixels": self.max_image_pixels,
            "image_check": self.image_check,
            "overlength": self.overlength,
            "leading_gpt": self.leading_gpt,
            "token_checks": self.checks_tokens,
        }

    def check_entry(self, entry: ManifestEntry) -> RecordCheck:
        if entry.error is not None:
            result = RecordCheck(entry.index, entry.line, None, location=entry.location)
            result.add(Reason.MALFORMED_JSON, None, entry.error)
            return result
        return self.check_record(entry.record, entry.index, entry.line, location=entry.location)

    def check_record(self, record: Any, index: int = 0, line: int = 0, *, location: str = "") -> RecordCheck:
        """All issues of one record (thread-safe; duplicate ids are checked by the manifest pass).

        ``location`` names the record in messages (default: ``line`` if given, else ``record #index``).
        A repaired record (the policies above) is in ``result.record``, its repairs in ``result.fixes``.
        """
        if not isinstance(record, dict):
            result = RecordCheck(index, line, None, location=location)
            result.add(
                Reason.MALFORMED_RECORD, None, f"a record must be a JSON object, got {type(record).__name__}"
            )
            return result
        rid = record.get("id")
        result = RecordCheck(index, line, None if rid is None else str(rid), location=location)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            result.add(
                Reason.MALFORMED_RECORD, "id", f"id must be a non-empty string or integer, got {rid!r}"
            )
        record = self._drop_leading_gpt(record, result)
        images = self._check_image_field(record, result)
        structure_ok = self._check_conversation(record, result, len(images) if images is not None else None)
        if images:
            for k, rel in enumerate(images):
                self._check_image(
                    rel, f"image[{k}]" if isinstance(record.get("image"), list) else "image", result
                )
        if structure_ok and images is not None and self.checks_tokens:
            self._check_tokens(record, result)
        return result

    def _drop_leading_gpt(self, record: dict, result: RecordCheck) -> dict:
        """``leading_gpt: drop``: the record without its first turn when that is the assistant's."""
        turns = record.get("conversations")
        if (
            self.leading_gpt != "drop"
            or not isinstance(turns, list)
            or len(turns) < 2
            or role_of(turns[0]) != GPT
        ):
            return record
        result.fixes.append(Fix.DROPPED_LEADING_GPT.value)
        result.record = {**record, "conversations": turns[1:]}
        return result.record

    def _check_image_field(self, record: dict, result: RecordCheck) -> list[Any] | None:
        image = record.get("image")
        if image is None:
            return []
        if isinstance(image, str) or (
            isinstance(image, list) and image and all(isinstance(p, str) for p in image)
        ):
            return record_images(record)
        result.add(
            Reason.MALFORMED_RECORD, "image", f"image must be a path string or a list of them, got {image!r}"
        )
        return None

    def _check_image(self, rel: str, field_name: str, result: RecordCheck) -> None:
        try:
            if self.image_check == "none":
                resolve_image_path(self.image_folder or ".", rel, follow_links=False)
                return
            path = resolve_image_path(self.image_folder, rel)
            open_image(path, max_pixels=self.max_image_pixels, check=self.image_check)
        except ImageIssue as issue:
            result.add(issue.reason, field_name, issue.detail)

    def _check_conversation(self, record: dict, result: RecordCheck, num_images: int | None) -> bool:
        turns, issues = conversation_issues(record.get("conversations"), num_images=num_images)
        for issue in issues:
            result.add(issue.reason, issue.field, issue.detail)
        return turns is not None and not issues

    def _check_tokens(self, record: dict, result: RecordCheck) -> None:
        assert isinstance(self.template, ConversationTemplate)
        try:
            sample = self.template.encode(
                record["conversations"],
                self.tokenizer,
                num_image_tokens=self.num_image_tokens,
                image_token_id=self._image_token_id,
            )
        except TemplateError as err:
            result.add(
                Reason.TEMPLATE_MISMATCH,
                err.field or "conversations",
                f"template {self.template.name!r}: {err.detail}",
            )
            return
        result.num_tokens = len(sample)
        if (
            self.overlength == "truncate_turns"
            and self.max_length is not None
            and len(sample) > self.max_length
        ):
            sample = self._truncate_turns(record, sample, result)
        fitted, reason = fit_to_length(sample, self.max_length, self.overlength, self._image_token_id)
        if reason is not None:
            result.add(reason, "conversations", f"{len(sample)} tokens > max_length {self.max_length}")
            return
        assert fitted is not None
        if answer_token_count(fitted, getattr(self.tokenizer, "eos_token_id", None)) == 0:
            result.add(Reason.FULLY_MASKED, "conversations", "no answer token would be supervised (loss 0)")

    def _truncate_turns(self, record: dict, sample: TokenizedSample, result: RecordCheck) -> TokenizedSample:
        """``overlength: truncate_turns``: the longest prefix of whole exchanges that fits (and keeps
        every ``<image>``), as ``result.record``; ``sample`` unchanged when none fits."""
        assert isinstance(self.template, ConversationTemplate) and self.max_length is not None
        turns = record["conversations"]
        images = len(record_images(record))
        for end in range(len(turns) - 2, 0, -2):  # drop one exchange (question + answer) at a time
            kept = turns[:end]
            if sum(t["value"].count(IMAGE_TOKEN) for t in kept) != images:
                break  # an image's placeholder would go: no shorter prefix keeps it either
            shorter = self.template.encode(
                kept,
                self.tokenizer,
                num_image_tokens=self.num_image_tokens,
                image_token_id=self._image_token_id,
            )
            if len(shorter) <= self.max_length:
                result.fixes.append(Fix.TRUNCATED_TURNS.value)
                result.record = {**record, "conversations": kept}
                result.num_tokens = len(shorter)
                return shorter
        return sample


def iter_checks(
    manifest: str | Path, validator: Validator, *, workers: int = 1, progress: bool = False
) -> Iterator[tuple[ManifestEntry, RecordCheck]]:
    """Stream ``(entry, check)`` pairs in manifest order; flags duplicate ids (all but the first)."""
    entries: Iterable[ManifestEntry] = iter_entries(manifest)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"validate {Path(manifest).name}", unit="rec", file=sys.stderr, mininterval=1.0)
    seen: set[str] = set()
    try:
        for entry, check in _map_checks(entries, validator, workers):
            if check.id is not None:
                if check.id in seen:
                    check.add(Reason.DUPLICATE_ID, "id", f"id {check.id!r} already used by an earlier record")
                seen.add(check.id)
            if bar is not None:
                bar.update(1)
            yield entry, check
    finally:
        if bar is not None:
            bar.close()


def _map_checks(
    entries: Iterable[ManifestEntry], validator: Validator, workers: int
) -> Iterator[tuple[ManifestEntry, RecordCheck]]:
    if workers <= 1:
        for entry in entries:
            yield entry, validator.check_entry(entry)
        return
    window = 64 * workers  # bounded look-ahead: memory stays flat on huge manifests
    with ThreadPoolExecutor(max_workers=workers) as pool:
        batch: list[ManifestEntry] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) == window:
                yield from zip(batch, pool.map(validator.check_entry, batch))
                batch = []
        yield from zip(batch, pool.map(validator.check_entry, batch))


@dataclass
class ValidationReport:
    """Invalid records and per-reason counts of one manifest."""

    manifest: str
    total: int = 0
    invalid: list[RecordCheck] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)  # repairs of kept records, per Fix
    token_checks: bool = False

    @property
    def num_invalid(self) -> int:
        return len(self.invalid)

    @property
    def ok(self) -> bool:
        return not self.invalid

    def add(self, check: RecordCheck) -> None:
        self.total += 1
        if not check.ok:
            self.invalid.append(check)
            self.counts.update(check.reasons)
        else:
            self.fixed.update(check.fixes)

    def format(self, max_records: int | None = None) -> str:
        lines = [f"manifest: {self.manifest}"]
        shown = self.invalid if max_records is None else self.invalid[:max_records]
        for check in shown:
            rid = check.id if check.id is not None else f"#{check.index}"
            for issue in check.issues:
                where_ = f" [{issue.field}]" if issue.field else ""
                lines.append(f"  {rid} ({check.location}): {issue.reason}{where_}: {issue.detail}")
        if len(shown) < len(self.invalid):
            lines.append(f"  ... {len(self.invalid) - len(shown)} more invalid record(s) not shown")
        lines.append(
            f"summary: {self.total} record(s), {self.total - self.num_invalid} valid, {self.num_invalid} invalid"
        )
        for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {count}")
        for fix, count in sorted(self.fixed.items()):
            lines.append(f"  kept after repair, {fix}: {count}")
        if not self.token_checks:
            lines.append(
                "  (token checks skipped: pass a tokenizer and a template to check length and label masks)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "manifest": self.manifest,
            "total": self.total,
            "valid": self.total - self.num_invalid,
            "invalid": self.num_invalid,
            "reasons": dict(sorted(self.counts.items())),
            "fixed": dict(sorted(self.fixed.items())),
            "token_checks": self.token_checks,
        }


def validate_manifest(
    manifest: str | Path, validator: Validator, *, workers: int = 1, progress: bool = False
) -> ValidationReport:
    """Check every record of ``manifest``; the report lists each invalid record and counts reasons."""
    report = ValidationReport(str(manifest), token_checks=validator.checks_tokens)
    for _, check in iter_checks(manifest, validator, workers=workers, progress=progress):
        report.add(check)
    return report
