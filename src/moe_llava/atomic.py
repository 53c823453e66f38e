"""Outputs written whole or not at all: a folder (a stage export, a backbone) or a file (a
checkpoint) is written under a temporary name beside its target, flushed to disk, then renamed
into place. A write that fails (disk full, I/O error) or is killed leaves the previous output as
it was; the failure raises :class:`~moe_llava.errors.WriteFailed`, naming the path and the cause;
the next write removes what a killed one left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from moe_llava.errors import WriteFailed


def _beside(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")  # hidden: never taken for an output


def _flush(path: Path) -> None:
    # Data still in the page cache must not be published by the rename, and write-back errors
    # (a full disk, a failing device) surface only here.
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_dir(target: str | Path, save: Callable[[Path], None], what: str) -> None:
    """``save(folder)`` into a temporary folder, then swap it in for ``target``."""
    target = Path(target)
    tmp, old = _beside(target, "tmp"), _beside(target, "old")
    if old.is_dir() and not target.exists():  # killed between the two renames below
        old.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)  # a killed write's leftovers
    shutil.rmtree(old, ignore_errors=True)
    try:
        save(tmp)
        _flush(tmp)
        if target.exists():  # a folder cannot be renamed over another: move the previous aside
            target.rename(old)
        tmp.rename(target)
    except BaseException as err:
        if old.is_dir() and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise WriteFailed.of(target, what, err) from err
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_file(target: str | Path, save: Callable[[Path], None], what: str) -> None:
    """``save(file)`` into a temporary file, then rename it over ``target``."""
    target = Path(target)
    tmp = _beside(target, "tmp")
    try:
        save(tmp)
        _flush(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteFailed.of(target, what, err) from err
        raise
