"""Exceptions of the data pipeline.

All of them are ``ValueError`` subclasses, so the ``moe-llava`` CLI reports them as one clear line.
Messages always name the file, the record (id or index) and the field when they are known.
"""

from __future__ import annotations

from pathlib import Path


def where(file: str | Path | None = None, record: str | int | None = None, field: str | None = None) -> str:
    """Format a location prefix such as ``train.json: record 'abc' (#12): field 'conversations[1].value'``."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if record is not None:
        parts.append(f"record {record!r}" if isinstance(record, str) else f"record #{record}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


class DataError(ValueError):
    """A problem with input data or data configuration."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        record: str | int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        self.detail = message
        prefix = where(file, record, field)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ManifestError(DataError):
    """A manifest file cannot be parsed (JSON syntax, wrong top-level structure)."""


class TemplateError(DataError):
    """A conversation does not fit the chosen conversation template."""


class RejectedFractionError(DataError):
    """Data preparation rejected more records than the configured threshold allows."""
