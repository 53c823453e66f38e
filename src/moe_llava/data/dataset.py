"""The map-style dataset: LLaVA records -> token ids, labels and pixel values.

Records are streamed from the manifest once and kept as compact JSON bytes (about the size of the
file), so a 665k-record manifest is never held as text *and* as Python objects. Structure is
checked at construction (no image I/O); prepare the manifest first (``moe-llava data prepare``) to
also check images and token lengths.

A bad record never crashes a training run mid-epoch: when an item cannot be built at run time (an
image vanished or got corrupted, a sample is longer than ``max_length``), the failure is logged
with the record id and reason, counted in :attr:`LlavaDataset.failures`, and the next record is
returned instead (at most ``max_fallbacks`` times in a row, then it raises).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from moe_llava.data.conversation import GPT, role_of
from moe_llava.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageIssue,
    ImageTransform,
    open_image,
    resolve_image_path,
)
from moe_llava.data.manifest import ManifestEntry, as_llava_record, iter_entries
from moe_llava.data.templates import get_template, image_token_id_of
from moe_llava.data.validation import Validator, fit_to_length, record_images
from moe_llava.errors import DataError, TemplateError

logger = logging.getLogger(__name__)


class LlavaDataset(Dataset):
    """LLaVA-format records as training (or generation) samples.

    Items are dicts ``{"id", "input_ids", "labels", "pixel_values", "num_images"}`` (+ ``"answer"``
    in generation mode): ``input_ids``/``labels`` are 1-D LongTensors, ``pixel_values`` is a
    ``(num_images, 3, H, W)`` FloatTensor or None for text-only records. Batch them with
    :class:`moe_llava.data.collator.LlavaCollator`.

    Args:
        manifest: path of a JSON/JSONL manifest, or an iterable of record dicts.
        tokenizer: any ``transformers`` tokenizer that knows ``<image>``.
        template: conversation template name (``plain``, ``phi``, ``vicuna_v1``, ...).
        image_processor: the vision tower's ``transformers`` image processor (needed if any record
            has an image).
        image_folder: folder the records' ``image`` paths are relative to.
        num_image_tokens: copies of the ``<image>`` token per image (from the model config).
        max_length: token budget per sample, image tokens included.
        image_aspect: ``pad`` (to square with the mean colour), ``crop`` (centre crop) or ``none``.
        pad_color: RGB padding colour; default the processor's mean.
        overlength: ``reject`` or ``truncate`` samples longer than ``max_length``.
        generation: build prompts for ``generate``: a trailing assistant answer is removed (kept as
            ``"answer"``), the prompt ends with the assistant prefix, labels are all ignored.
        strict: raise on structurally invalid records (default); otherwise log and skip them.
        limit: keep only the first ``limit`` valid records.
    """

    def __init__(
        self,
        manifest: str | Path | Iterable[dict],
        tokenizer: Any,
        *,
        template: Any = "phi",
        image_processor: Any = None,
        image_folder: str | Path | None = None,
        num_image_tokens: int = 1,
        max_length: int | None = 2048,
        image_aspect: str = "pad",
        pad_color: Sequence[int] | None = None,
        overlength: str = "reject",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        generation: bool = False,
        strict: bool = True,
        limit: int | None = None,
        max_fallbacks: int = 16,
    ) -> None:
        self.source = str(manifest) if isinstance(manifest, (str, Path)) else "<records>"
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.overlength = overlength
        self.max_image_pixels = max_image_pixels
        self.generation = generation
        self.max_fallbacks = max_fallbacks
        self.image_token_id = image_token_id_of(tokenizer)
        self.transform = (
            ImageTransform(image_processor, image_aspect, pad_color) if image_processor is not None else None
        )
        self.failures: list[tuple[str, str]] = []  # (record id, reason) of run-time fallbacks
        self.rejected: list[tuple[str, list[str]]] = []  # (record id or #index, reasons) skipped at load
        self._records: list[bytes] = []
        self.has_image: list[bool] = []
        self.lengths: list[int] = []  # approximate token counts, for length grouping
        self._load(manifest, strict, limit)

    # ------------------------------------------------------------------ loading
    def _entries(self, manifest: Any) -> Iterable[ManifestEntry]:
        if isinstance(manifest, (str, Path)):
            return iter_entries(manifest)
        return (ManifestEntry(i, 0, record, in_array=True) for i, record in enumerate(manifest))

    def _load(self, manifest: Any, strict: bool, limit: int | None) -> None:
        validator = Validator(image_folder=self.image_folder, image_check="none")
        seen: set[str] = set()
        for entry in self._entries(manifest):
            record = entry.record
            if self.generation:
                record = entry.record = as_llava_record(record)
                record = _with_dummy_answer(record)
            check = validator.check_entry(replace(entry, record=record))
            if check.id is not None and check.id in seen:
                check.add("duplicate_id", "id", f"id {check.id!r} already used by an earlier record")
            if check.id is not None:
                seen.add(check.id)
            if not check.ok:
                self.rejected.append((check.id or f"#{entry.index}", check.reasons))
                continue
            images = record_images(record)
            if images and self.transform is None:
                raise DataError(
                    "record has an image but the dataset has no image_processor",
                    file=self.source,
                    record=check.id,
                )
            self._records.append(json.dumps(entry.record, ensure_ascii=False, separators=(",", ":")).encode())
            self.has_image.append(bool(images))
            words = sum(len(turn["value"].split()) for turn in record["conversations"])
            self.lengths.append(words + len(images) * (self.num_image_tokens - 1))
            if limit is not None and len(self._records) >= limit:
                break
        if self.rejected:
            shown = "; ".join(f"{rid}: {','.join(reasons)}" for rid, reasons in self.rejected[:5])
            message = (
                f"{len(self.rejected)} invalid record(s) ({shown}{' ...' if len(self.rejected) > 5 else ''}); "
                "run `moe-llava data prepare` to quarantine them"
            )
            if strict:
                raise DataError(message, file=self.source)
            logger.warning("%s: skipping %s", self.source, message)
        if not self._records:
            raise DataError("no usable record", file=self.source)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._records)

    def record(self, index: int) -> dict:
        """The raw record at ``index``."""
        return json.loads(self._records[index])

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_fallbacks + 1):
            i = (index + attempt) % len(self._records)
            try:
                return self._build(i)
            except (DataError, ImageIssue) as err:
                rid = str(self.record(i).get("id"))
                reason = getattr(err, "reason", None) or type(err).__name__
                self.failures.append((rid, str(reason)))
                logger.warning(
                    "%s: record %r unusable at run time (%s: %s); using the next record",
                    self.source,
                    rid,
                    reason,
                    err,
                )
        raise DataError(
            f"{self.max_fallbacks + 1} consecutive records failed from index {index}", file=self.source
        )

    def _build(self, index: int) -> dict:
        record = self.record(index)
        rid = str(record["id"])
        conversations = record["conversations"]
        answer = None
        if self.generation and role_of(conversations[-1]) == GPT:
            answer = conversations[-1]["value"]
            conversations = conversations[:-1]
        try:
            sample = self.template.encode(
                conversations,
                self.tokenizer,
                num_image_tokens=self.num_image_tokens,
                image_token_id=self.image_token_id,
                add_generation_prompt=self.generation,
            )
        except TemplateError as err:
            raise DataError(
                f"template {self.template.name!r}: {err.detail}",
                file=self.source,
                record=rid,
                field=err.field,
            ) from None
        if self.generation:
            if self.max_length is not None and len(sample) > self.max_length:
                raise DataError(
                    f"prompt of {len(sample)} tokens > max_length {self.max_length}",
                    file=self.source,
                    record=rid,
                )
        else:
            fitted, reason = fit_to_length(sample, self.max_length, self.overlength, self.image_token_id)
            if fitted is None:
                err = DataError(
                    f"{reason}: {len(sample)} tokens, max_length {self.max_length}",
                    file=self.source,
                    record=rid,
                )
                err.reason = reason  # type: ignore[attr-defined]
                raise err
            sample = fitted
        pixel_values = None
        paths = record_images(record)
        if paths:
            images = []
            for rel in paths:
                try:
                    path = resolve_image_path(self.image_folder, rel)
                    images.append(open_image(path, max_pixels=self.max_image_pixels, check="full"))
                except ImageIssue as issue:
                    err = DataError(issue.detail, file=self.source, record=rid, field="image")
                    err.reason = issue.reason  # type: ignore[attr-defined]
                    raise err from None
            assert self.transform is not None
            pixel_values = self.transform(images)
        item = {
            "id": rid,
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_images": sample.num_images,
        }
        if self.generation:
            item["answer"] = answer
        return item


def _with_dummy_answer(record: Any) -> Any:
    """Generation prompts may end with a human turn; validate them as if answered."""
    if not isinstance(record, dict):
        return record
    conversations = record.get("conversations")
    if (
        isinstance(conversations, list)
        and conversations
        and isinstance(conversations[-1], dict)
        and role_of(conversations[-1]) != GPT
    ):
        return {**record, "conversations": [*conversations, {"from": "gpt", "value": "-"}]}
    return record
