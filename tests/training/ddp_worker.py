"""Run as a script by :func:`run_two_ranks` (the DDP tests): Lightning's DDP launcher re-executes it
for rank 1; each rank saves its weights at the end of training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

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


def run_two_ranks(out_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """Train a stage in 2 DDP processes (this file as the script); both ranks end with the same
    weights, which are returned (rank 0's)."""
    proc = subprocess.run(
        [sys.executable, __file__, str(out_dir), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out_dir / "rank1.json").read_text())["world_size"] == 2
    rank0, rank1 = load_file(out_dir / "rank0.safetensors"), load_file(out_dir / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    return rank0


if __name__ == "__main__":
    out_dir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_stage(cfg, callbacks=[SaveRankWeights(out_dir)])
