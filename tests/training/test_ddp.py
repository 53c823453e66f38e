"""Stage 3 with 2 CPU processes (gloo DDP, find_unused_parameters=False): both ranks end identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import shrunk_overrides

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.timeout(600)
def test_stage3_ddp_two_cpu_processes_ranks_identical(shapesworld, dense_export, tmp_path):
    overrides = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage3",
        f"init_from={dense_export}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "rank1.json").read_text())["world_size"] == 2
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    initial = load_file(dense_export / "model.safetensors")
    dense_key = "language_model.model.layers.0.mlp.up_proj.weight"
    moved = [
        e
        for e in range(4)
        if not torch.equal(
            rank0[f"language_model.model.layers.0.mlp.experts.{e}.up_proj.weight"], initial[dense_key]
        )
    ]
    assert moved, "the experts trained"
    assert torch.equal(
        rank0["language_model.model.layers.0.self_attn.q_proj.weight"],
        initial["language_model.model.layers.0.self_attn.q_proj.weight"],
    )
