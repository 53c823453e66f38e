"""The real Hydra config composes for every preset and trainer, and invalid settings name their key."""

from __future__ import annotations

import re
import typing

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_llava.config import compose_config
from moe_llava.errors import ConfigError
from moe_llava.model.upcycle import find_decoder_layers
from moe_llava.paths import CONF_DIR
from moe_llava.training.lit_module import param_groups
from moe_llava.training.strategies import build_strategy, is_checkpoint_io_compatible
from moe_llava.training.validation import PRECISION, validate_stage_config


def composed(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(overrides))


@pytest.mark.parametrize("experiment", ["tiny_cpu", "phi2_clip336", "qwen_clip336", "stablelm_clip336"])
@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_presets_compose_and_validate(experiment, stage):
    cfg = composed(f"experiment={experiment}", f"stage={stage}")
    validate_stage_config(cfg, check_paths=False)
    assert cfg["stage"]["name"] == stage


def test_paper_recipes_keep_paper_hyperparameters():
    stage1 = composed("experiment=phi2_clip336", "stage=stage1")["stage"]
    stage3 = composed("experiment=phi2_clip336", "stage=stage3")
    assert (stage1["lr"], stage1["global_batch_size"], stage1["trainable"]) == (1e-3, 256, ["projector"])
    assert (stage3["stage"]["lr"], stage3["stage"]["global_batch_size"]) == (2e-5, 128)
    assert stage3["stage"]["trainable"] == ["projector", "ffn"]
    assert stage3["moe"] == {
        **stage3["moe"],
        "num_experts": 4,
        "top_k": 2,
        "layers": "sparse",
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
    }
    assert stage3["data"]["stages"]["stage3"]["template"] == "phi"
    assert (
        composed("experiment=qwen_clip336", "stage=stage2")["data"]["stages"]["stage2"]["template"] == "qwen"
    )


def test_command_line_stage_values_win_over_the_preset():
    assert composed("experiment=tiny_cpu", "stage=stage2")["stage"]["lr"] == 2e-3  # preset value
    assert composed("experiment=tiny_cpu", "stage=stage2", "stage.lr=0.123")["stage"]["lr"] == 0.123


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_stage_presets_compose_with_hydra(stage):
    """stage_preset/<experiment>/<stage>.yaml is chosen by Hydra's defaults list: it wins over
    stage/<stage>.yaml, the command line wins over it, and without an experiment there is none."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plain = compose("config", overrides=[f"stage={stage}"])
        tiny = compose(
            "config", overrides=["experiment=tiny_cpu", f"stage={stage}"], return_hydra_config=True
        )
        explicit = compose("config", overrides=["experiment=tiny_cpu", f"stage={stage}", "stage.epochs=7"])
    assert tiny.hydra.runtime.choices["stage_preset@stage"] == f"tiny_cpu/{stage}"
    preset = OmegaConf.load(CONF_DIR / "stage_preset" / "tiny_cpu" / f"{stage}.yaml")
    defaults = OmegaConf.load(CONF_DIR / "stage" / f"{stage}.yaml")
    assert OmegaConf.to_container(plain.stage) == OmegaConf.to_container(defaults)
    assert OmegaConf.to_container(tiny.stage) == OmegaConf.to_container(OmegaConf.merge(defaults, preset))
    assert preset.epochs != 7 and explicit.stage.epochs == 7
    assert OmegaConf.to_container(explicit.stage) == {**OmegaConf.to_container(tiny.stage), "epochs": 7}


@pytest.mark.parametrize("experiment", ["tiny_cpu", "phi2_clip336", "qwen_clip336", "stablelm_clip336"])
def test_router_loss_coefficients_have_one_source(experiment):
    cfg = composed(f"experiment={experiment}", "moe.router_aux_loss_coef=0.05")
    assert "router_aux_loss_coef" not in cfg["model"] and "router_z_loss_coef" not in cfg["model"]
    assert cfg["moe"]["router_aux_loss_coef"] == 0.05


def test_trainer_callbacks_and_loggers_are_instantiated_from_config(tiny_vlm, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from moe_llava.training.callbacks import RouterStatsLogger
    from moe_llava.training.loggers import BufferedMLFlowLogger
    from moe_llava.training.run import build_trainer, stage_paths

    cfg = compose_config(
        [
            "experiment=tiny_cpu",
            "stage=stage3",
            f"run_dir={tmp_path}",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "trainer.enable_progress_bar=false",
            "callbacks.router_stats.every_n_steps=3",
            "stage.micro_batch_size=8",
        ]
    )
    stage = validate_stage_config(cfg, check_paths=False).stage
    trainer = build_trainer(cfg, stage, tiny_vlm, stage_paths(cfg), run_id=None, extra_callbacks=[])
    assert (trainer.max_steps, trainer.max_epochs, trainer.accumulate_grad_batches) == (200, 1, 4)
    assert trainer.gradient_clip_val == 1.0 and trainer.num_sanity_val_steps == 0
    assert {ModelCheckpoint, LearningRateMonitor, RouterStatsLogger} <= {type(c) for c in trainer.callbacks}
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.dirpath == str(tmp_path / "stage3" / "checkpoints")
    assert checkpoint._every_n_train_steps == 50  # the tiny_cpu preset's stage.checkpoint_every_n_steps
    assert next(c for c in trainer.callbacks if isinstance(c, RouterStatsLogger)).every_n_steps == 3
    assert [type(lg) for lg in trainer.loggers] == [BufferedMLFlowLogger, CSVLogger]
    assert trainer.loggers[1].log_dir == str(tmp_path / "stage3" / "logs")
    assert trainer.loggers[0].local_copy == str(tmp_path / "stage3" / "logs" / "metrics.csv")


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp", "deepspeed_stage_2"])
def test_trainer_configs_compose_and_validate(trainer):
    cfg = composed(
        "experiment=tiny_cpu", f"trainer={trainer}", "stage.global_batch_size=64", "stage.micro_batch_size=8"
    )
    validate_stage_config(cfg, check_paths=False)


def test_fsdp_wraps_each_decoder_layer_so_the_moe_block_is_one_unit(tiny_vlm):
    cfg = composed("trainer=fsdp")
    tiny_vlm.upcycle()
    strategy = build_strategy(cfg["trainer"]["strategy"], tiny_vlm)
    assert type(strategy).__name__ == "FSDPStrategy" and not is_checkpoint_io_compatible(strategy)
    wrapped = strategy.kwargs[
        "auto_wrap_policy"
    ]._module_classes  # Lightning turns the set into a ModuleWrapPolicy
    assert type(find_decoder_layers(tiny_vlm.language_model)[0]) in wrapped
    assert not any(cls.__name__ in ("SparseMoeBlock", "LlamaMLP") for cls in wrapped), (
        "experts are not split apart"
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stage.lr=0"], "stage.lr"),
        (["stage.global_batch_size=30", "stage.micro_batch_size=8"], "stage.global_batch_size"),
        (
            ["trainer.devices=3", "stage.global_batch_size=32", "stage.micro_batch_size=8"],
            "stage.global_batch_size",
        ),
        (["moe.top_k=5"], "moe.top_k"),
        (["moe.num_experts=1"], "moe.num_experts"),
        (["moe.layers=every_other"], "moe.layers"),
        (["moe.capacity_factor=0"], "moe.capacity_factor"),
        (["moe.expert_path=grouped"], "moe.expert_path"),
        (["stage.trainable=[projector,attention]"], "stage.trainable"),
        (["stage.warmup_ratio=1.5"], "stage.warmup_ratio"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["trainer.strategy=horovod"], "trainer.strategy"),
        (["model.language_model.config.model_type=not-a-model"], "model.language_model.config.model_type"),
        (["model.vision_tower.config.model_type=llama"], "model.vision_tower.config.model_type"),
        (["resume=sometimes"], "resume"),
        (["seed=abc"], "seed"),
        (["stage.lr_scale={vision:0.1}"], "stage.lr_scale.vision"),
        (["stage.lr_scale={vision_tower:0}"], "stage.lr_scale.vision_tower"),
        (["stage.epochs=two"], "stage.epochs"),
        (["moe.router_aux_loss_coef=-1"], "moe.router_aux_loss_coef"),
        (["trainer.accelerator=quantum"], "trainer.accelerator"),
        (["export.dtype=fp8"], "export.dtype"),
        (["export.max_shard_size=big"], "export.max_shard_size"),
        (["++stage_overrides.stage1.lr=0.1"], "stage_overrides"),  # the old mechanism is not ignored
        (["data.max_length=0"], "data.max_length"),
        (["data.overlength=cut"], "data.overlength"),
        (["data.leading_gpt=keep"], "data.leading_gpt"),
        (["data.max_image_pixels=-1"], "data.max_image_pixels"),
        (["data.pad_color=[1,2]"], "data.pad_color"),
        (["data.validation.image_check=everything"], "data.validation.image_check"),
        (["data.validation.max_rejected_fraction=1.5"], "data.validation.max_rejected_fraction"),
        (["data.stages.stage2.template=llama9"], "data.stages.stage2.template"),
        (["data.eval.image_aspect=stretch"], "data.eval.image_aspect"),
    ],
)
def test_invalid_settings_name_the_key(overrides, key):
    cfg = composed("experiment=tiny_cpu", *overrides)
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}:"):
        validate_stage_config(cfg, check_paths=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+stage.learning_rate=0.1", "stage: unknown keys ['learning_rate']"),  # the schema has no such key
        ("+data.max_lenght=128", "data: unknown keys ['max_lenght']"),
        ("+data.stages.stage1.tempalte=phi", "data.stages.stage1: unknown keys ['tempalte']"),
        ("~stage.lr", "stage.lr: is missing"),
        ("data.stages.stage2.template=llama9", "data.stages.stage2.template: unknown template 'llama9'"),
    ],
)
def test_a_typo_or_a_missing_key_is_named_with_its_section(override, message):
    cfg = composed("experiment=tiny_cpu", override)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        validate_stage_config(cfg, check_paths=False)


def test_the_precision_literal_is_what_lightning_accepts():
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    def values(tp) -> set:
        args = typing.get_args(tp)
        return {value for arg in args for value in (values(arg) or {arg})} if args else set()

    assert values(PRECISION) == values(_PRECISION_INPUT)


def test_the_checked_sections_come_back_typed():
    settings = validate_stage_config(composed("experiment=tiny_cpu", "stage=stage3", "stage.lr=1e-3"), False)
    assert settings.stage.lr == 1e-3 and isinstance(settings.stage.micro_batch_size, int)
    assert settings.moe.num_experts >= 2 and settings.data.stages["stage3"].template
    assert (settings.export.dtype, settings.seed) == ("auto", 42)
    assert settings.data.num_workers == 0 and settings.lora.enabled is False


def test_missing_data_and_previous_export_are_reported_before_any_work(tmp_path):
    cfg = composed("experiment=tiny_cpu", f"data.root={tmp_path}/nowhere")
    with pytest.raises(ConfigError, match=r"^data\.stages\.stage1\.train: manifest .* does not exist"):
        validate_stage_config(cfg)
    cfg = composed("experiment=tiny_cpu", "stage=stage2", f"run_dir={tmp_path}")
    cfg["data"]["stages"]["stage2"]["train"] = __file__  # any existing file: the check after it fails
    cfg["data"]["stages"]["stage2"]["val"] = None
    cfg["data"]["image_folder"] = str(tmp_path)
    cfg["data"]["tokenizer"] = None
    with pytest.raises(ConfigError, match=r"^init_from: stage2 starts from stage1.s export"):
        validate_stage_config(cfg)


def test_lr_scale_gives_each_part_its_own_learning_rate(tiny_vlm):
    cfg = composed("experiment=tiny_cpu", "stage=stage1", "stage.lr_scale={vision_tower:0.1}")
    validate_stage_config(cfg, check_paths=False)
    assert cfg["stage"]["lr_scale"] == {"vision_tower": 0.1}
    tiny_vlm.language_model.requires_grad_(False)
    low, high = sorted(param_groups(tiny_vlm, 1e-3, cfg["stage"]["lr_scale"]), key=lambda g: g["lr"])
    assert (low["lr"], high["lr"]) == (pytest.approx(1e-4), 1e-3)
    assert {id(p) for p in low["params"]} == {id(p) for p in tiny_vlm.vision_tower.parameters()}
    assert {id(p) for p in high["params"]} == {id(p) for p in tiny_vlm.projector.parameters()}
