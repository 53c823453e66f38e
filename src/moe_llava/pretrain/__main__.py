"""Pretrain the backbones:  python -m moe_llava.pretrain experiment=tiny_cpu [overrides...]

DVC's ``backbones`` stage runs it on ``params/stage1.yaml`` (``--config-dir params --config-name stage1``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe_llava.paths import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from moe_llava.errors import WriteFailed
    from moe_llava.pretrain import run_backbones

    try:
        print(run_backbones(cfg))
    except WriteFailed as err:  # disk full, I/O error: the path and the cause, not a traceback
        print(f"moe-llava pretrain: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
