"""The package's exceptions, all in one place.

Every error a user can fix is a ``ValueError`` subclass, so the ``moe-llava`` commands report it as
one clear line (exit 2) instead of a traceback:

* :class:`ConfigError`: an invalid configuration value; the message starts with the key;
* :class:`DataError` and its kinds (:class:`ManifestError`, :class:`TemplateError`,
  :class:`RejectedFractionError`, :class:`EvalFileError`): a problem with input data; messages name
  the file, the record (id or index) or line, and the field when they are known.

:class:`TrackingUnavailable`: the MLflow tracking server did not answer (a ``ValueError`` too: the
fix is to start it or to point the tracking URI elsewhere); :class:`RegistryBusy`: another process
holds the registry's lock for longer than the wait allows.

:class:`Terminated` is what a tracked run (:mod:`moe_llava.tracking`) raises on SIGTERM, so the run
is ended ``KILLED`` like on Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


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


class EvalFileError(DataError):
    """A malformed question or answer file; the message names the file, the line and the field."""

    def __init__(
        self, message: str, *, file: str | Path, line: int | None = None, field: str | None = None
    ) -> None:
        self.file, self.record, self.field, self.detail, self.line = str(file), None, field, message, line
        parts = [str(file), *([f"line {line}"] if line else []), *([f"field {field!r}"] if field else [])]
        ValueError.__init__(self, ": ".join([*parts, message]))


class TrackingUnavailable(ValueError):
    """The MLflow tracking server at a URI did not answer; the message names the URI and the fix."""

    def __init__(self, uri: str, message: str):
        super().__init__(f"MLflow tracking server {uri}: {message}")
        self.uri = uri


class RegistryBusy(ValueError):
    """Another process held the registry's lock for longer than the wait allows; names the lock and its holder."""


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM while a tracked run was open (ends the run ``KILLED``, like Ctrl-C)."""
