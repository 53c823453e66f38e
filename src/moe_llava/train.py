"""Train one MoE-Tuning stage:  python -m moe_llava.train stage=stage2 experiment=tiny_cpu [overrides...]

The same command serves the CLI (`moe-llava train ...`), `dvc repro` and the Prefect flow.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from moe_llava.paths import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from moe_llava.errors import user_errors
    from moe_llava.training import run_stage

    # a bad config, data past the rejected-fraction limit, weights that are not an export, a tracking
    # server that is down (all found before any work): one line, exit 2; a failed write: exit 1
    with user_errors("moe-llava train"):
        result = run_stage(cfg)
    print({k: v for k, v in result.items() if k in ("global_step", "train/loss", "val/loss", "wall_time_s")})


if __name__ == "__main__":
    main()
