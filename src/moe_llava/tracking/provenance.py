"""What a run, a backbone step, an evaluation or a registered version was built from: one set of tags."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

LOCK_FILE = "requirements.lock"
PROVENANCE_KEYS = ("git_commit", "data_hash", "lock_hash")


def provenance_tags(
    model: Any = None, *, inherited: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """``git_commit``, ``data_hash`` and ``lock_hash`` of this checkout, and ``moe`` (the model's MoE
    settings as JSON, or ``dense``) when a ``model`` is given; the same tags on every run.

    ``inherited``: tags of the run a result came from (a registered version's training run); a value
    it has wins over this checkout's. A value that is not known is None (left out of a run's tags).
    """
    inherited = inherited or {}
    tags: dict[str, str | None] = {  # the PROVENANCE_KEYS
        "git_commit": inherited.get("git_commit") or git_commit(),
        "data_hash": inherited.get("data_hash") or data_hash(),
        "lock_hash": inherited.get("lock_hash") or lock_hash(),
    }
    if model is not None:
        tags["moe"] = json.dumps(model.config.moe) if model.is_moe else "dense"
    return tags


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def data_hash(dvc_file: str | Path = "data.dvc") -> str | None:
    """The md5 DVC recorded for the raw data (``data.dvc``), or None outside a DVC checkout."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def lock_hash(lock_file: str | Path = LOCK_FILE) -> str:
    """sha256 of the dependency lock (``requirements.lock``), or ``"absent"`` where there is none."""
    path = Path(lock_file)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
