"""Run by test_ddp.py as a script: Lightning's DDP launcher re-executes it for rank 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from moe_llava.paths import CONF_DIR
from moe_llava.training import run_stage


class SaveRankWeights(L.Callback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
        }  # untie shared tensors
        save_file(state, str(self.out_dir / f"rank{trainer.global_rank}.safetensors"))
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"world_size": trainer.world_size})
        )


if __name__ == "__main__":
    out_dir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_stage(cfg, callbacks=[SaveRankWeights(out_dir)])
