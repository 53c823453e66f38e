"""Where the project's Hydra configs live (the repository's `conf/`, or $MOE_LLAVA_CONF_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = Path(os.environ.get("MOE_LLAVA_CONF_DIR", REPO_ROOT / "conf"))


def is_local_path(value: object) -> bool:
    """A local file or folder (as opposed to a hub id such as ``microsoft/phi-2``): it exists, is
    absolute or explicitly relative (``./``, ``~``), or has more than the two parts of ``org/name``."""
    if not value or not isinstance(value, str):
        return False
    return Path(value).exists() or value.startswith(("/", ".", "~")) or len(Path(value).parts) > 2
