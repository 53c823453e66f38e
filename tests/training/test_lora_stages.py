"""LoRA stages end to end on the real config: only adapters and full modules train, the merged export
is a plain export that every command takes, adapter exports merge with the CLI, resume, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from safetensors.torch import load_file

from moe_llava.cli import main
from moe_llava.errors import ConfigError
from moe_llava.inference import Answerer
from moe_llava.model.checkpoint import load_export_model
from moe_llava.registry.settings import RegistrySettings
from moe_llava.registry.workflow import register_export
from moe_llava.training import run_stage, validate_stage_config
from tests.training.conftest import shrunk_overrides
from tests.training.test_stages import ParameterChangeRecorder

LORA3 = ("lora=experts", "lora.r=4", "lora.alpha=8")
WORKER = Path(__file__).with_name("ddp_worker.py")


def _experts_diverged(state: dict, layer: int = 0, proj: str = "down_proj") -> bool:
    weights = [state[f"language_model.model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] for e in range(4)]
    return all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))


@pytest.mark.timeout(600)
def test_stage3_lora_trains_only_adapters_and_exports_a_plain_model_that_registers(
    compose_stage, dense_export, shapesworld, tmp_path
):
    recorder = ParameterChangeRecorder()
    result = run_stage(compose_stage("stage3", f"init_from={dense_export}", *LORA3), callbacks=[recorder])
    assert result["global_step"] == 3
    assert recorder.changed == recorder.trainable, "exactly the adapters and full modules moved"
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in recorder.trainable)
    fully = {n.split(".modules_to_save")[0] for n in recorder.trainable if "modules_to_save" in n}
    assert fully == {"projector", "language_model.model.layers.0.mlp.router", "language_model.model.layers.2.mlp.router"}

    export = tmp_path / "artifacts" / "stage3" / "export"
    state = load_file(export / "model.safetensors")
    assert not [k for k in state if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    assert _experts_diverged(state), "each expert's adapters made it differ from its siblings"
    dense = load_file(dense_export / "model.safetensors")
    attention = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[attention], dense[attention]), "attention is frozen in stage 3"

    # A plain export: it loads as every command loads one, answers, and registers.
    model = load_export_model(export)
    assert model.config.moe["layers"] == [0, 2] and model.config.conversation_template
    image = sorted((shapesworld / "images" / "test").glob("*.png"))[0]
    (answer,) = Answerer.from_pretrained(export, max_new_tokens=2).answer([(image, "Is there a circle?")])
    assert isinstance(answer, str)
    settings = RegistrySettings(
        model_name="lora-test",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        logger={"artifact_location": str(tmp_path / "mlartifacts")},
        experiment_name="lora-registry",
    )
    registered = register_export(export, {"pope/mean_f1": 0.5}, settings=settings)
    assert registered.version == "1" and "champion" in registered.aliases

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (tmp_path / "artifacts" / "stage3" / "COMPLETED").read_text()
    params = client.get_run(run_id).data.params
    assert int(params["trainable.experts.lora"]) > 0 and int(params["trainable.routers.full"]) > 0
    assert int(params["trainable.total"]) == int(result["trainable_parameters"])
    assert params["lora.enabled"] == "True"
