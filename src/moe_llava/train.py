"""Train one MoE-Tuning stage:  python -m moe_llava.train stage=stage2 experiment=tiny_cpu [overrides...]

The same command serves the CLI (`moe-llava train ...`), `dvc repro` and the Prefect flow.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe_llava.paths import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from moe_llava.errors import CheckpointError, ConfigError, DataError, TrackingUnavailable, WriteFailed
    from moe_llava.training import run_stage

    try:
        result = run_stage(cfg)
    except ConfigError as err:  # one readable line, before any work started
        print(f"moe-llava train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, DataError) as err:
        # weights that are not an export (names the file); data over the rejected-fraction limit
        # (names the quarantine file): found before the model loaded (moe_llava.training.preflight)
        print(f"moe-llava train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except WriteFailed as err:  # disk full, I/O error: the path and the cause, not a traceback
        print(f"moe-llava train: {err}", file=sys.stderr)
        sys.exit(1)
    except TrackingUnavailable as err:  # checked before any work too
        print(f"moe-llava train: error: {err}", file=sys.stderr)
        sys.exit(2)
    print({k: v for k, v in result.items() if k in ("global_step", "train/loss", "val/loss", "wall_time_s")})


if __name__ == "__main__":
    main()
