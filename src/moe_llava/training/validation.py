"""Check a composed stage config before any work starts; every error names the offending key.

The ``stage``, ``moe``, ``lora``, ``data`` and ``export`` nodes are
:class:`~moe_llava.schema.ConfigSection` models: a wrong type, a missing or an unknown key, or a
value out of range is a :class:`~moe_llava.errors.ConfigError` naming its key, and the checked
values come back typed (:class:`StageSettings`) for the stage to run on. Names other code owns
are asked of it, not copied: strategies and accelerators from Lightning, backbones from
transformers, layer modes and trainable groups from this package (precisions are a literal that
a test compares with Lightning's). The same check runs on the standalone ``params/<stage>.yaml``
files of the DVC pipeline, which is why it does not depend on conf/'s defaults lists.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, Field, field_validator, model_validator

from moe_llava.data.images import ASPECT_MODES
from moe_llava.data.templates import TEMPLATES
from moe_llava.data.validation import IMAGE_CHECKS, LEADING_GPT_POLICIES, OVERLENGTH_POLICIES
from moe_llava.errors import ConfigError
from moe_llava.model.builder import VISION_TOWER_CLASSES
from moe_llava.model.checkpoint import ADAPTER_CONFIG, ADAPTERS_ONLY
from moe_llava.model.lora import QUANTIZE_MODES
from moe_llava.model.moe import EXPERT_PATHS
from moe_llava.model.upcycle import LAYER_MODES
from moe_llava.schema import ConfigSection
from moe_llava.training.stages import STAGES, TRAINABLE_GROUPS, previous_stage

LR_SCALE_PARTS = ("vision_tower", "projector", "language_model")
LORA_EXPORTS = ("merged", "adapter")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")  # export.dtype (auto: the training precision)
# trainer.precision: what Lightning's Trainer accepts (tests/training/test_validation.py compares)
PRECISION = Literal[
    64, 32, 16, "64", "32", "16", "bf16", "transformer-engine", "transformer-engine-float16",
    "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true",
]  # fmt: skip
PRECISIONS = tuple(str(value) for value in typing.get_args(PRECISION))

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


class StageConfig(ConfigSection):
    """``conf/stage/*.yaml`` (after the experiment's ``stage_preset``)."""

    KEY: ClassVar[str] = "stage"
    name: Literal[STAGES]
    trainable: list[str]  # the groups of TRAINABLE_GROUPS, unless train_modules is set
    upcycle: bool
    lr: Positive
    global_batch_size: Annotated[int, Field(gt=0)]
    micro_batch_size: Annotated[int, Field(gt=0)]
    epochs: int
    max_steps: int
    warmup_ratio: Fraction
    weight_decay: NonNegative
    lr_scale: dict[str, float] | None  # per-part lr multipliers
    max_grad_norm: float | None
    gradient_checkpointing: bool
    checkpoint_every_n_steps: Annotated[int, Field(ge=1)]
    val_every_n_steps: int | None

    @field_validator("lr_scale")
    @classmethod
    def _known_parts(cls, lr_scale: dict[str, float] | None) -> dict[str, float] | None:
        for part, scale in (lr_scale or {}).items():
            key = f"stage.lr_scale.{part}"
            _check(part in LR_SCALE_PARTS, key, f"unknown part; expected one of {LR_SCALE_PARTS}")
            _check(scale > 0, key, f"must be a number > 0, got {scale!r}")
        return lr_scale

    @model_validator(mode="after")
    def _trains_at_all(self) -> StageConfig:
        _check(
            self.epochs >= 1 or self.max_steps > 0,
            "stage.epochs",
            "must be >= 1 (or set stage.max_steps > 0)",
        )
        return self


class MoEConfig(ConfigSection):
    """``conf/moe/*.yaml``: the upcycling layout and the loss coefficients."""

    KEY: ClassVar[str] = "moe"
    num_experts: Annotated[int, Field(ge=2)]
    top_k: Annotated[int, Field(ge=1)]
    layers: str | list[int]  # a mode of LAYER_MODES or a list of layer indices
    capacity_factor: Positive | None  # null: dropless
    eval_capacity_factor: Positive | None
    min_capacity: Annotated[int, Field(ge=0)]
    second_expert_noise: bool
    count_padding: bool
    router_aux_loss_coef: NonNegative
    router_z_loss_coef: NonNegative
    expert_path: Literal[EXPERT_PATHS]  # how the experts run (moe_llava.model.moe.block)

    @field_validator("layers", mode="before")
    @classmethod
    def _mode_or_indices(cls, layers: Any) -> Any:
        if isinstance(layers, str):
            _check(
                layers in LAYER_MODES,
                "moe.layers",
                f"unknown mode {layers!r}; expected {LAYER_MODES} or indices",
            )
        else:
            ok = isinstance(layers, list) and bool(layers) and all(isinstance(i, int) for i in layers)
            _check(ok, "moe.layers", f"expected a mode or a non-empty list of integers, got {layers!r}")
        return layers

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        experts = self.num_experts
        _check(
            self.top_k <= experts, "moe.top_k", f"must be in [1, moe.num_experts={experts}], got {self.top_k}"
        )
        return self


class LoraConfig(ConfigSection):
    """``conf/lora/*.yaml``: LoRA adapters (:mod:`moe_llava.model.lora`) instead of full training."""

    KEY: ClassVar[str] = "lora"
    enabled: bool = False
    r: Annotated[int, Field(ge=1)] = 16  # the rank
    alpha: Positive = 32.0
    dropout: Fraction = 0.05
    target_modules: list[str] = []  # regexes over module names
    full_modules: list[str] = []  # trained fully beside the adapters
    export: Literal[LORA_EXPORTS] = "merged"
    quantize: Literal[QUANTIZE_MODES] | None = None  # QLoRA (CUDA only)

    @field_validator("target_modules", "full_modules")
    @classmethod
    def _regexes(cls, patterns: list[str], info) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"lora.{info.field_name}[{i}]", f"not a regex ({err}): {pattern!r}"
                ) from None
        return patterns

    @model_validator(mode="after")
    def _targets_some(self) -> LoraConfig:
        if self.enabled:
            _check(bool(self.target_modules), "lora.target_modules", "is empty: no module would get adapters")
        return self


class ExportConfig(ConfigSection):
    """``export``: how a stage's export is written."""

    KEY: ClassVar[str] = "export"
    dtype: Literal[EXPORT_DTYPES] = "auto"
    max_shard_size: int | str = "5GB"

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, shard: Any) -> Any:
        ok = (isinstance(shard, int) and not isinstance(shard, bool) and shard > 0) or (
            isinstance(shard, str) and re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", shard) is not None
        )
        if not ok:
            raise ValueError(f"expected a byte count or a size such as 5GB, got {shard!r}")
        return shard


def _known_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
    return template


def _known_aspect(aspect: str) -> str:
    if aspect not in ASPECT_MODES:
        raise ValueError(f"must be one of {ASPECT_MODES}, got {aspect!r}")
    return aspect


# a stage's prompt format, and the evaluation's (data.eval), checked by the same two rules
PROMPT_RULES = {"template": _known_template, "image_aspect": _known_aspect}


class DataValidationConfig(ConfigSection):
    """``data.validation``: how data preparation checks records."""

    KEY: ClassVar[str] = "data.validation"
    image_check: Literal[IMAGE_CHECKS] = "full"
    max_rejected_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    workers: Annotated[int, Field(ge=1)] = 1


class DataStageConfig(ConfigSection):
    """``data.stages.<stage>``: a stage's manifests and prompt format."""

    KEY: ClassVar[str] = "data.stages"
    template: Annotated[str, AfterValidator(_known_template)]
    image_aspect: Annotated[str, AfterValidator(_known_aspect)] = "pad"
    train: str | None = None
    val: str | None = None


class DataConfig(ConfigSection):
    """``conf/data/*.yaml``: an unknown key (a typo) or an impossible value names its key."""

    KEY: ClassVar[str] = "data"
    name: str
    root: str
    stages: dict[str, DataStageConfig]
    image_folder: str | None = None
    tokenizer: str | None = None
    max_length: Annotated[int, Field(gt=0)] | None = None
    overlength: Literal[OVERLENGTH_POLICIES] = "reject"
    leading_gpt: Literal[LEADING_GPT_POLICIES] = "reject"
    pad_color: list[int] | None = None
    max_image_pixels: Annotated[int, Field(gt=0)] = 40_000_000
    num_workers: Annotated[int, Field(ge=0)] = 0
    validation: DataValidationConfig = DataValidationConfig()
    eval: Any = None  # benchmark files: checked by the evaluation before the model loads
    generator: Any = None  # ShapesWorld generator settings (its own dataclass checks them)

    @field_validator("stages", mode="before")
    @classmethod
    def _each_stage(cls, stages: Any) -> Any:
        if not isinstance(stages, Mapping):
            return stages  # pydantic names the wrong type
        checked = {}
        for name, node in stages.items():
            try:
                checked[name] = DataStageConfig.of(node)
            except ConfigError as err:  # a section knows its key, not the stage it is under
                key = f"data.stages.{name}{err.key.removeprefix(DataStageConfig.KEY)}"
                raise ConfigError(key, str(err).removeprefix(f"{err.key}: ")) from None
        return checked

    @field_validator("eval")
    @classmethod
    def _eval_prompt(cls, node: Any) -> Any:
        for field, rule in PROMPT_RULES.items():
            if isinstance(node, Mapping) and node.get(field) is not None:
                try:
                    rule(node[field])
                except ValueError as err:
                    raise ConfigError(f"data.eval.{field}", str(err)) from None
        return node

    @field_validator("pad_color", mode="before")
    @classmethod
    def _rgb(cls, color: Any) -> Any:
        ok = color is None or (
            isinstance(color, list)
            and len(color) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        )
        if not ok:
            raise ValueError(f"must be null or three 0-255 integers, got {color!r}")
        return color


@dataclass(frozen=True)
class StageSettings:
    """A stage config's checked sections, typed: what the stage reads its values from."""

    seed: int
    stage: StageConfig
    moe: MoEConfig
    lora: LoraConfig
    data: DataConfig
    export: ExportConfig


def section(schema: type[ConfigSection], node: Any) -> ConfigSection:
    """``node`` (a config node, resolved: interpolations refer to the root) checked into ``schema``."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return schema.of(values)


def check_quantize(cfg: Mapping, lora: LoraConfig, at_run_time: bool) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes: refuse before any model loads."""
    if not (lora.enabled and lora.quantize):
        return
    _check(
        cfg["trainer"].get("accelerator") != "cpu",
        "lora.quantize",
        f"{lora.quantize} (QLoRA) needs a CUDA GPU, but trainer.accelerator is cpu: set lora.quantize=null",
    )
    if not at_run_time:
        return
    import torch

    _check(
        torch.cuda.is_available(),
        "lora.quantize",
        f"{lora.quantize} (QLoRA) needs a CUDA GPU and this machine has none: set lora.quantize=null",
    )
    _check(
        importlib.util.find_spec("bitsandbytes") is not None,
        "lora.quantize",
        f"{lora.quantize} (QLoRA) needs bitsandbytes: pip install 'moe-tuning[qlora]'",
    )


def world_size(trainer_cfg: Mapping) -> int | None:
    """Data-parallel world size when the config fixes it (None for devices=-1/auto: known at run time)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    return None


def accumulation_steps(stage: StageConfig, world: int) -> int:
    micro, global_batch = stage.micro_batch_size, stage.global_batch_size
    per_step = micro * world
    if global_batch % per_step:
        raise ConfigError(
            "stage.global_batch_size",
            f"{global_batch} is not a multiple of micro_batch_size x world size = {micro} x {world} = {per_step}",
        )
    return global_batch // per_step


def validate_stage_config(cfg: Mapping[str, Any] | DictConfig, check_paths: bool = True) -> StageSettings:
    """Check ``cfg`` (``check_paths``: also the files and folders it names, and this machine for
    QLoRA); returns its sections typed."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if cfg.get("stage_overrides"):  # the old preset mechanism: say so rather than ignore the values
        raise ConfigError(
            "stage_overrides",
            "removed: an experiment's per-stage values are conf/stage_preset/<experiment>/<stage>.yaml, "
            "and stage.<key>=... on the command line wins over them",
        )
    stage = section(StageConfig, cfg.stage)
    if not cfg.get("train_modules"):
        groups = stage.trainable
        _check(
            bool(groups) and all(g in TRAINABLE_GROUPS for g in groups),
            "stage.trainable",
            f"expected a non-empty list of {TRAINABLE_GROUPS}, got {list(groups)}",
        )
    world = world_size(cfg.trainer)
    if world is not None:
        accumulation_steps(stage, world)
    seed = cfg.get("seed", 0)
    _check(isinstance(seed, int) and not isinstance(seed, bool), "seed", f"expected an integer, got {seed!r}")
    settings = StageSettings(
        seed=seed,
        stage=stage,
        moe=section(MoEConfig, cfg.moe),
        lora=section(LoraConfig, cfg.get("lora")),
        data=section(DataConfig, cfg.data),
        export=section(ExportConfig, cfg.get("export")),
    )
    check_quantize(cfg, settings.lora, at_run_time=check_paths)
    _validate_model(cfg.model)
    _validate_trainer(cfg.trainer)
    _check(
        cfg.get("resume", "auto") in ("auto", "never"),
        "resume",
        f"expected auto or never, got {cfg.get('resume')!r}",
    )
    if check_paths:
        _validate_paths(cfg, stage.name)
    return settings


def _validate_model(model: Mapping) -> None:
    for role in ("vision_tower", "language_model"):
        spec = model.get(role) or {}
        config = spec.get("config") or {}
        if not spec.get("name_or_path") and not config:
            raise ConfigError(f"model.{role}", "needs name_or_path (hub id or local folder) or config values")
        _check(not config or "model_type" in config, f"model.{role}.config.model_type", "is missing")
    vision_type = (model.get("vision_tower", {}).get("config") or {}).get("model_type")
    _check(
        not vision_type or vision_type in VISION_TOWER_CLASSES,
        "model.vision_tower.config.model_type",
        f"unsupported backbone {vision_type!r}; supported: {sorted(VISION_TOWER_CLASSES)}",
    )
    lm_type = (model.get("language_model", {}).get("config") or {}).get("model_type")
    if lm_type:
        from transformers import CONFIG_MAPPING

        _check(
            lm_type in CONFIG_MAPPING,
            "model.language_model.config.model_type",
            f"unknown backbone {lm_type!r}",
        )


def _validate_trainer(trainer: Mapping) -> None:
    """The names Lightning accepts: strategies and accelerators from its registries."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    precision = str(trainer.get("precision", "32-true"))
    _check(
        precision in PRECISIONS,
        "trainer.precision",
        f"expected one of {sorted(set(PRECISIONS))}, got {precision!r}",
    )
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str):
        names = ["auto", *StrategyRegistry.available_strategies()]
        _check(
            strategy in names, "trainer.strategy", f"unknown strategy {strategy!r}; expected one of {names}"
        )
    else:
        _check(
            isinstance(strategy, Mapping) and "_target_" in strategy,
            "trainer.strategy",
            "expected a strategy name or a mapping with _target_",
        )
    accelerators = {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}
    accelerator = trainer.get("accelerator")
    _check(accelerator in accelerators, "trainer.accelerator", f"unknown accelerator {accelerator!r}")


def _validate_paths(cfg: Mapping, stage: str) -> None:
    data = cfg["data"]
    stages = data.get("stages") or {}
    _check(stage in stages, f"data.stages.{stage}", "is missing from the data config")
    train = stages[stage].get("train")
    _check(bool(train), f"data.stages.{stage}.train", "no training manifest configured")
    _check(
        Path(train).is_file(),
        f"data.stages.{stage}.train",
        f"manifest {train} does not exist (generate or pull the data first)",
    )
    val = stages[stage].get("val")
    _check(not val or Path(val).is_file(), f"data.stages.{stage}.val", f"manifest {val} does not exist")
    folder = data.get("image_folder")
    _check(not folder or Path(folder).is_dir(), "data.image_folder", f"folder {folder} does not exist")
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
        _check(
            Path(init_from).exists() or str(init_from).count("/") != 1,
            "init_from",
            f"{init_from} is not a folder; a hub id is not downloaded here: download it (e.g. `hf download "
            f"{init_from} --local-dir DIR`), then for a released MoE-LLaVA checkpoint run "
            "`moe-llava model convert DIR DST` and use DST",
        )
        _check(
            not (Path(init_from) / ADAPTER_CONFIG).is_file() or (Path(init_from) / "config.json").is_file(),
            "init_from",
            f"{init_from} {ADAPTERS_ONLY}",
        )
        _check(
            (Path(init_from) / "config.json").is_file(),
            "init_from",
            f"{init_from} is not a save_pretrained export (no config.json)",
        )
        from moe_llava.model.convert.configmap import convert_hint, is_released_checkpoint

        released = is_released_checkpoint(init_from)
        if released:
            raise ConfigError("init_from", f"{init_from} is {convert_hint(init_from, released)}")
    elif previous_stage(stage):
        prev = previous_stage(stage)
        export = Path(cfg["run_dir"]) / prev / "export"
        _check(
            not (export / ADAPTER_CONFIG).is_file() or (export / "config.json").is_file(),
            "init_from",
            f"{stage} starts from {prev}'s export {export}, which {ADAPTERS_ONLY}; or set init_from",
        )
        _check(
            (export / "config.json").is_file(),
            "init_from",
            f"{stage} starts from {prev}'s export {export}, which does not exist: run {prev} first or set init_from",
        )
