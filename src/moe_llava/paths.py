"""Where the project's Hydra configs live (the repository's `conf/`, or $MOE_LLAVA_CONF_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = Path(os.environ.get("MOE_LLAVA_CONF_DIR", REPO_ROOT / "conf"))
