"""LoRA stages end to end on the real config: only adapters and full modules train, the merged export
is a plain export that every command takes, adapter exports merge with the CLI, resume, DDP."""

from __future__ import annotations

import re

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
from tests.training.ddp_worker import run_two_ranks
from tests.training.test_stages import ParameterChangeRecorder

LORA3 = ("lora=experts", "lora.r=4", "lora.alpha=8")


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
    assert fully == {
        "projector",
        "language_model.model.layers.0.mlp.router",
        "language_model.model.layers.2.mlp.router",
    }

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


class FailAt(L.Callback):
    """Raises once the optimizer reaches ``step`` (an in-process crash: the run ends FAILED, its checkpoints stay)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash for the test")


class AdaptersAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items() if "lora_" in k}


@pytest.mark.timeout(600)
def test_adapter_export_resumes_with_its_adapters_and_merges_with_the_cli(
    compose_stage, dense_export, tmp_path, capsys
):
    overrides = [
        f"init_from={dense_export}",
        *LORA3,
        "lora.export=adapter",
        "stage.gradient_checkpointing=true",
        "stage.max_steps=2",
        "stage.warmup_ratio=0",  # the first step moves lora_B off zero: the checkpoint holds trained adapters
    ]
    with pytest.raises(RuntimeError, match="crash for the test"):
        run_stage(compose_stage("stage3", *overrides), callbacks=[FailAt(2)])
    stage_dir = tmp_path / "artifacts" / "stage3"
    checkpoint = torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
    assert checkpoint["global_step"] == 1
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k), "trained adapters were saved"

    at_start = AdaptersAtStart()
    result = run_stage(compose_stage("stage3", *overrides), callbacks=[at_start])
    assert result["resumed"] is True and result["global_step"] == 2
    assert at_start.state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(at_start.state[key], value), f"{key} not restored from the checkpoint"

    adapter = stage_dir / "export"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "config.json").exists()
    with pytest.raises(ConfigError, match=r"^init_from: .*LoRA adapters only .*merge-lora"):
        validate_stage_config(compose_stage("stage3", f"init_from={adapter}"))

    merged = tmp_path / "merged"
    assert main(["model", "merge-lora", str(dense_export), str(adapter), str(merged)]) == 0
    assert "MoE layers [0, 2]" in capsys.readouterr().out
    model = load_export_model(merged)
    assert model.is_moe and (merged / "tokenizer.json").is_file()
    assert _experts_diverged(load_file(merged / "model.safetensors"))
    assert main(["model", "merge-lora", str(dense_export), str(tmp_path / "nowhere"), str(merged)]) == 2
    assert "not an adapter export" in capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["lora=experts", "lora.r=0"], "lora.r"),
        (["lora=experts", "lora.quantize=nf4"], "lora.quantize"),  # QLoRA on the CPU trainer
        (["lora=experts", "lora.quantize=nf4", "trainer=gpu"], "lora.quantize"),  # on a machine without CUDA
        (["lora=experts", "lora.export=zip"], "lora.export"),
        (["lora=experts", "+lora.rank=8"], "lora: unknown keys ['rank']"),  # the whole message
        (["lora=experts", "lora.target_modules=[]"], "lora.target_modules"),
        (["lora=experts", "lora.full_modules=['(']"], "lora.full_modules[0]"),
    ],
)
def test_bad_lora_settings_are_one_line_naming_the_key_before_the_model_loads(compose_stage, overrides, key):
    if "trainer=gpu" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="^" + re.escape(key) + "(:|$)") as err:
        validate_stage_config(compose_stage("stage3", *overrides))
    assert "\n" not in str(err.value)


def test_a_target_matching_nothing_is_one_line_naming_the_key(compose_stage, dense_export):
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: pattern '.*nope.*' matches no module$"):
        run_stage(
            compose_stage(
                "stage3", f"init_from={dense_export}", "lora=experts", r"lora.target_modules=['\.nope$']"
            )
        )
    with pytest.raises(
        ConfigError, match=r"^lora\.target_modules: .*self_attn.* is outside the stage's trainable set"
    ):
        run_stage(compose_stage("stage3", f"init_from={dense_export}", "lora=lm"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stage3_lora_ddp_two_cpu_processes_ranks_identical(shapesworld, dense_export, tmp_path):
    overrides = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage3",
        f"init_from={dense_export}",
        *LORA3,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "stage.max_steps=2",
    ]
    rank0 = run_two_ranks(tmp_path, overrides)
    assert any("lora_B" in k for k in rank0)
    assert all(rank0[k].abs().sum() > 0 for k in rank0 if "experts.0.up_proj.lora_B" in k), "adapters trained"
