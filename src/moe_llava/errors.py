"""The package's exceptions, all in one place.

Every error a user can fix is a :class:`UserError` (a ``ValueError``), which every entry point
(:class:`user_errors`: ``moe-llava``, ``python -m moe_llava.pretrain``) reports as one line, exit 2;
any other exception (a bug, in this package or in torch) keeps its traceback:

* :class:`ConfigError`: an invalid configuration value; the message starts with the key;
* :class:`DataError` and its kinds (:class:`ManifestError`, :class:`TemplateError` and its
  :class:`ConversationError`, :class:`RejectedFractionError`, :class:`EvalFileError`): a problem with input data; messages name
  the file, the record (id or index) or line, and the field when they are known.
* :class:`CheckpointError`: a model folder or weights file that is not one of this project's
  exports (another architecture, a pickle posing as weights, a corrupt file); it names the file.

:class:`WriteFailed` (an ``OSError``): writing an output (a checkpoint, an export) failed part-way,
disk full or an I/O error; the message names the path and the cause, and the previous output there
is unchanged (:mod:`moe_llava.atomic`); :func:`user_errors` reports it as one line, exit 1.

:class:`TrackingUnavailable`: the MLflow tracking server did not answer (a user error too: the
fix is to start it or to point the tracking URI elsewhere); :class:`RegistryBusy`: another process
holds the registry's lock for longer than the wait allows.

:class:`Terminated` is what a tracked run (:mod:`moe_llava.tracking`) raises on SIGTERM, so the run
is ended ``KILLED`` like on Ctrl-C.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path


class UserError(ValueError):
    """An error the user can fix (a config value, an input file, a server to start): one line, exit 2."""


class ConfigError(UserError):
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


class DataError(UserError):
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


class ConversationError(TemplateError):
    """A conversation breaks the LLaVA turn rules (:mod:`moe_llava.data.conversation`); ``reason`` is
    the validation reason code. A :class:`TemplateError`, since templates are where most callers meet it."""

    def __init__(self, message: str, *, field: str, reason: str) -> None:
        super().__init__(message, field=field)
        self.reason = reason


class RejectedFractionError(DataError):
    """Data preparation rejected more records than the configured threshold allows."""


class EvalFileError(DataError):
    """A malformed question or answer file; the message names the file, the record's location
    (``line N`` in JSON Lines, ``record #i`` in a JSON array) and the field."""

    def __init__(
        self, message: str, *, file: str | Path, location: str | None = None, field: str | None = None
    ) -> None:
        self.file, self.record, self.field, self.detail = str(file), None, field, message
        self.location = location
        parts = [str(file), *([location] if location else []), *([f"field {field!r}"] if field else [])]
        ValueError.__init__(self, ": ".join([*parts, message]))


class CheckpointError(UserError):
    """A model folder or weights file that is not a loadable MoE-LLaVA export; the message names the file."""

    def __init__(self, message: str, *, file: str | Path) -> None:
        self.file = str(file)
        self.detail = message
        super().__init__(f"{file}: {message}")


# what a user reads for the OS errors of a failed write (any other: "write failed")
WRITE_FAILURES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EFBIG: "file size limit reached",
    errno.EROFS: "read-only file system",
}


class WriteFailed(OSError):
    """Writing an output failed part-way (disk full, I/O error); the previous output is unchanged."""

    @classmethod
    def of(cls, path: str | Path, what: str, cause: OSError) -> WriteFailed:
        reason = WRITE_FAILURES.get(cause.errno, "write failed")
        return cls(  # the OS error is its __cause__ (raise ... from)
            f"{path}: writing the {what} failed: {reason} ({cause.strerror or cause}); "
            f"the previous {what} at this path, if any, is unchanged"
        )


class TrackingUnavailable(UserError):
    """The MLflow tracking server at a URI did not answer; the message names the URI and the fix."""

    def __init__(self, uri: str, message: str):
        super().__init__(f"MLflow tracking server {uri}: {message}")
        self.uri = uri


class RegistryBusy(UserError):
    """Another process held the registry's lock for longer than the wait allows; names the lock and its holder."""


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM while a tracked run was open (ends the run ``KILLED``, like Ctrl-C)."""


class user_errors:  # lower case: used like a function, `with user_errors("moe-llava train"):`
    """The one way an entry point reports what the user can fix; a context manager.

    A :class:`UserError` inside the block is printed as ``<prog>: error: <message>`` (``config error``
    for a :class:`ConfigError`) and the process exits 2; a :class:`WriteFailed` as ``<prog>: <message>``,
    exit 1. Any other exception propagates with its traceback. ``exit=False`` (a ``main`` that returns
    its exit code, like ``moe-llava``'s): the error is swallowed and the code kept in :attr:`code`.
    """

    def __init__(self, prog: str, *, exit: bool = True) -> None:
        self.prog, self.exit, self.code = prog, exit, 0

    def __enter__(self) -> user_errors:
        return self

    def __exit__(self, exc_type, err, traceback) -> bool:
        if isinstance(err, WriteFailed):  # disk full, I/O error: the path and the cause
            self.code, line = 1, f"{self.prog}: {err}"
        elif isinstance(err, UserError):
            kind = "config error" if isinstance(err, ConfigError) else "error"
            self.code, line = 2, f"{self.prog}: {kind}: {err}"
        else:
            return False
        print(line, file=sys.stderr)
        if self.exit:
            raise SystemExit(self.code) from None
        return True
