"""Stage 3 with 2 CPU processes (gloo DDP, find_unused_parameters=False): both ranks end identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import shrunk_overrides
from tests.training.ddp_worker import run_two_ranks


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
    rank0 = run_two_ranks(tmp_path, overrides)
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
