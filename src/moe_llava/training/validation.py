"""Validate a resolved stage config before any work starts; every error names the offending key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.model.builder import VISION_TOWER_CLASSES
from moe_llava.model.moe import EXPERT_PATHS
from moe_llava.model.upcycle import LAYER_MODES
from moe_llava.training.stages import STAGES, TRAINABLE_GROUPS, previous_stage

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
STRATEGY_NAMES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "fsdp",
    "deepspeed",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "single_device",
)


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _positive(cfg: Mapping, key: str, prefix: str, allow_zero: bool = False) -> None:
    value = cfg.get(key)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ConfigError(
            f"{prefix}.{key}",
            f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}",
        )


def world_size(trainer_cfg: Mapping) -> int | None:
    """Data-parallel world size when the config fixes it (None for devices=-1/auto: known at run time)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return None


def accumulation_steps(stage_cfg: Mapping, world: int) -> int:
    micro, global_batch = int(stage_cfg["micro_batch_size"]), int(stage_cfg["global_batch_size"])
    per_step = micro * world
    if global_batch % per_step:
        raise ConfigError(
            "stage.global_batch_size",
            f"{global_batch} is not a multiple of micro_batch_size x world size = {micro} x {world} = {per_step}",
        )
    return global_batch // per_step


LR_SCALE_PARTS = ("vision_tower", "projector", "language_model")


def validate_stage_config(cfg: Mapping[str, Any], check_paths: bool = True) -> None:
    stage = cfg["stage"]
    name = stage.get("name")
    if name not in STAGES:
        raise ConfigError("stage.name", f"unknown stage {name!r}; expected one of {STAGES}")
    if not cfg.get("train_modules"):
        groups = stage.get("trainable") or []
        unknown = [g for g in groups if g not in TRAINABLE_GROUPS]
        if unknown or not groups:
            raise ConfigError(
                "stage.trainable", f"expected a non-empty list of {TRAINABLE_GROUPS}, got {list(groups)}"
            )
    _positive(stage, "lr", "stage")
    _positive(stage, "micro_batch_size", "stage")
    _positive(stage, "global_batch_size", "stage")
    _positive(stage, "weight_decay", "stage", allow_zero=True)
    for part, scale in (stage.get("lr_scale") or {}).items():
        if part not in LR_SCALE_PARTS:
            raise ConfigError(f"stage.lr_scale.{part}", f"unknown part; expected one of {LR_SCALE_PARTS}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ConfigError(f"stage.lr_scale.{part}", f"must be a number > 0, got {scale!r}")
    if not 0 <= float(stage.get("warmup_ratio", 0)) < 1:
        raise ConfigError("stage.warmup_ratio", f"must be in [0, 1), got {stage.get('warmup_ratio')}")
    if int(stage.get("epochs", 1)) < 1 and int(stage.get("max_steps", -1)) <= 0:
        raise ConfigError("stage.epochs", "must be >= 1 (or set stage.max_steps > 0)")
    if int(stage.get("checkpoint_every_n_steps", 1)) < 1:
        raise ConfigError("stage.checkpoint_every_n_steps", "must be >= 1")
    world = world_size(cfg["trainer"])
    if world is not None:
        accumulation_steps(stage, world)

    _validate_moe(cfg["moe"])
    _validate_model(cfg["model"])
    _validate_trainer(cfg["trainer"])
    if cfg.get("resume", "auto") not in ("auto", "never"):
        raise ConfigError("resume", f"expected auto or never, got {cfg.get('resume')!r}")
    if check_paths:
        _validate_paths(cfg, name)


def _validate_moe(moe: Mapping) -> None:
    experts, top_k = moe.get("num_experts"), moe.get("top_k")
    if not isinstance(experts, int) or experts < 2:
        raise ConfigError("moe.num_experts", f"must be an integer >= 2, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ConfigError("moe.top_k", f"must be in [1, moe.num_experts={experts}], got {top_k!r}")
    layers = moe.get("layers")
    if isinstance(layers, str):
        if layers not in LAYER_MODES:
            raise ConfigError(
                "moe.layers", f"unknown mode {layers!r}; expected {LAYER_MODES} or a list of indices"
            )
    elif not layers or not all(isinstance(i, int) for i in layers):
        raise ConfigError("moe.layers", f"expected a mode or a non-empty list of integers, got {layers!r}")
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = moe.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"moe.{key}", f"must be > 0 or null (dropless), got {value!r}")
    for key in ("router_aux_loss_coef", "router_z_loss_coef"):
        _positive(moe, key, "moe", allow_zero=True)
    if moe.get("expert_path", "auto") not in EXPERT_PATHS:
        raise ConfigError(
            "moe.expert_path", f"expected one of {EXPERT_PATHS}, got {moe.get('expert_path')!r}"
        )


def _validate_model(model: Mapping) -> None:
    for role in ("vision_tower", "language_model"):
        spec = model.get(role) or {}
        config = spec.get("config") or {}
        if not spec.get("name_or_path") and not config:
            raise ConfigError(f"model.{role}", "needs name_or_path (hub id or local folder) or config values")
        if config and "model_type" not in config:
            raise ConfigError(f"model.{role}.config.model_type", "is missing")
    vision_type = (model.get("vision_tower", {}).get("config") or {}).get("model_type")
    if vision_type and vision_type not in VISION_TOWER_CLASSES:
        raise ConfigError(
            "model.vision_tower.config.model_type",
            f"unsupported backbone {vision_type!r}; supported: {sorted(VISION_TOWER_CLASSES)}",
        )
    lm_type = (model.get("language_model", {}).get("config") or {}).get("model_type")
    if lm_type:
        from transformers import CONFIG_MAPPING

        if lm_type not in CONFIG_MAPPING:
            raise ConfigError("model.language_model.config.model_type", f"unknown backbone {lm_type!r}")


def _validate_trainer(trainer: Mapping) -> None:
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"expected one of {PRECISIONS}, got {precision!r}")
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str):
        if strategy not in STRATEGY_NAMES:
            raise ConfigError(
                "trainer.strategy", f"unknown strategy {strategy!r}; expected one of {STRATEGY_NAMES}"
            )
    elif not isinstance(strategy, Mapping) or "_target_" not in strategy:
        raise ConfigError("trainer.strategy", "expected a strategy name or a mapping with _target_")
    if trainer.get("accelerator") not in ("cpu", "gpu", "cuda", "mps", "tpu", "auto"):
        raise ConfigError("trainer.accelerator", f"unknown accelerator {trainer.get('accelerator')!r}")


def _validate_paths(cfg: Mapping, stage: str) -> None:
    data = cfg["data"]
    stages = data.get("stages") or {}
    if stage not in stages:
        raise ConfigError(f"data.stages.{stage}", "is missing from the data config")
    train = stages[stage].get("train")
    if not train:
        raise ConfigError(f"data.stages.{stage}.train", "no training manifest configured")
    if not Path(train).is_file():
        raise ConfigError(
            f"data.stages.{stage}.train", f"manifest {train} does not exist (generate or pull the data first)"
        )
    val = stages[stage].get("val")
    if val and not Path(val).is_file():
        raise ConfigError(f"data.stages.{stage}.val", f"manifest {val} does not exist")
    folder = data.get("image_folder")
    if folder and not Path(folder).is_dir():
        raise ConfigError("data.image_folder", f"folder {folder} does not exist")
    tokenizer = Path(data["tokenizer"]) if data.get("tokenizer") else None
    # A local path (absolute, or under an existing folder such as data/) must exist; else a hub id.
    if (
        tokenizer
        and not tokenizer.exists()
        and (tokenizer.is_absolute() or Path(tokenizer.parts[0]).is_dir())
    ):
        raise ConfigError("data.tokenizer", f"{tokenizer} does not exist")
    init_from = cfg.get("init_from")
    if init_from:
        if not (Path(init_from) / "config.json").is_file():
            raise ConfigError("init_from", f"{init_from} is not a save_pretrained export (no config.json)")
    elif previous_stage(stage):
        export = Path(cfg["run_dir"]) / previous_stage(stage) / "export"
        if not (export / "config.json").is_file():
            raise ConfigError(
                "init_from",
                f"{stage} starts from {previous_stage(stage)}'s export {export}, which does not exist: run {previous_stage(stage)} first or set init_from",
            )
