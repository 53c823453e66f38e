"""Pretrain the backbones:  python -m moe_llava.pretrain experiment=tiny_cpu [overrides...]

DVC's ``backbones`` stage runs it on ``params/stage1.yaml`` (``--config-dir params --config-name stage1``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from moe_llava.paths import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from moe_llava.errors import user_errors
    from moe_llava.pretrain import run_backbones

    with user_errors("moe-llava pretrain"):  # exit 2 (a user error) or 1 (a failed write), one line
        print(run_backbones(cfg))


if __name__ == "__main__":
    main()
