"""Check a composed stage config before any work starts; every error names the offending key.

The ``stage`` and ``moe`` nodes are structured configs: the dataclasses below are merged under the
composed values, so OmegaConf rejects a wrong type, a missing or an unknown key (naming it), and
each field's :func:`rule` states its range. Names other code owns are asked of it, not copied:
precisions, strategies and accelerators from Lightning, backbones from transformers, layer modes
and trainable groups from this package. The same check runs on the standalone ``params/<stage>.yaml``
files of the DVC pipeline, which is why it does not depend on conf/'s defaults lists.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_llava.data.images import ASPECT_MODES
from moe_llava.data.templates import TEMPLATES
from moe_llava.data.validation import IMAGE_CHECKS, LEADING_GPT_POLICIES, OVERLENGTH_POLICIES
from moe_llava.errors import ConfigError
from moe_llava.model.builder import VISION_TOWER_CLASSES
from moe_llava.model.checkpoint import ADAPTER_CONFIG, ADAPTERS_ONLY
from moe_llava.model.lora import QUANTIZE_MODES
from moe_llava.model.moe import EXPERT_PATHS
from moe_llava.model.upcycle import LAYER_MODES
from moe_llava.training.stages import STAGES, TRAINABLE_GROUPS, previous_stage

LR_SCALE_PARTS = ("vision_tower", "projector", "language_model")
LORA_EXPORTS = ("merged", "adapter")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")  # export.dtype (auto: the training precision)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


RULES = {  # field metadata -> (test, wording)
    "gt": (lambda value, bound: value > bound, "> {}"),
    "ge": (lambda value, bound: value >= bound, ">= {}"),
    "lt": (lambda value, bound: value < bound, "< {}"),
    "le": (lambda value, bound: value <= bound, "<= {}"),
    "one_of": (lambda value, choices: value in choices, "one of {}"),
}


def rule(default: Any = MISSING, **checks: Any):
    """A schema field whose value (when not null) must pass ``checks``: gt=0, ge=0, lt=1, one_of=(...)."""
    return field(default=default, metadata=checks)


class Schema:
    """A structured config whose fields carry :func:`rule` checks; errors name ``<section>.<field>``."""

    section = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            for name, bound in f.metadata.items():
                test, wording = RULES[name]
                key = f"{self.section}.{f.name}"
                _check(
                    value is None or test(value, bound),
                    key,
                    f"must be {wording.format(bound)}, got {value!r}",
                )
        self.check()

    def check(self) -> None:
        """Checks across fields."""


@dataclass
class StageConfig(Schema):
    """Schema of ``conf/stage/*.yaml`` (after the experiment's ``stage_preset``)."""

    section = "stage"
    name: str = rule(one_of=STAGES)
    trainable: list[str]  # the groups of TRAINABLE_GROUPS, unless train_modules is set
    upcycle: bool
    lr: float = rule(gt=0)
    global_batch_size: int = rule(gt=0)
    micro_batch_size: int = rule(gt=0)
    epochs: int
    max_steps: int
    warmup_ratio: float = rule(ge=0, lt=1)
    weight_decay: float = rule(ge=0)
    lr_scale: dict[str, float] | None  # per-part lr multipliers
    max_grad_norm: float | None
    gradient_checkpointing: bool
    checkpoint_every_n_steps: int = rule(ge=1)
    val_every_n_steps: int | None

    def check(self) -> None:
        for part, scale in (self.lr_scale or {}).items():
            key = f"stage.lr_scale.{part}"
            _check(part in LR_SCALE_PARTS, key, f"unknown part; expected one of {LR_SCALE_PARTS}")
            _check(scale > 0, key, f"must be a number > 0, got {scale!r}")
        _check(
            self.epochs >= 1 or self.max_steps > 0,
            "stage.epochs",
            "must be >= 1 (or set stage.max_steps > 0)",
        )


@dataclass
class MoEConfig(Schema):
    """Schema of ``conf/moe/*.yaml``: the upcycling layout and the loss coefficients."""

    section = "moe"
    num_experts: int = rule(ge=2)
    top_k: int = rule(ge=1)
    layers: Any  # a mode of LAYER_MODES or a list of layer indices
    capacity_factor: float | None = rule(gt=0)  # null: dropless
    eval_capacity_factor: float | None = rule(gt=0)
    min_capacity: int = rule(ge=0)
    second_expert_noise: bool
    count_padding: bool
    router_aux_loss_coef: float = rule(ge=0)
    router_z_loss_coef: float = rule(ge=0)
    expert_path: str = rule(one_of=EXPERT_PATHS)  # how the experts run (moe_llava.model.moe.block)

    def check(self) -> None:
        experts, layers = self.num_experts, self.layers
        _check(
            self.top_k <= experts, "moe.top_k", f"must be in [1, moe.num_experts={experts}], got {self.top_k}"
        )
        if isinstance(layers, str):
            _check(
                layers in LAYER_MODES,
                "moe.layers",
                f"unknown mode {layers!r}; expected {LAYER_MODES} or indices",
            )
        else:
            ok = bool(layers) and all(isinstance(i, int) for i in layers)
            _check(ok, "moe.layers", f"expected a mode or a non-empty list of integers, got {layers!r}")


@dataclass
class LoraConfig(Schema):
    """Schema of ``conf/lora/*.yaml``: LoRA adapters (:mod:`moe_llava.model.lora`) instead of full training."""

    section = "lora"
    enabled: bool = False
    r: int = rule(16, ge=1)  # the rank
    alpha: float = rule(32.0, gt=0)
    dropout: float = rule(0.05, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=list)  # regexes over module names
    full_modules: list[str] = field(default_factory=list)  # trained fully beside the adapters
    export: str = rule("merged", one_of=LORA_EXPORTS)
    quantize: str | None = rule(None, one_of=QUANTIZE_MODES)  # QLoRA (CUDA only)

    def check(self) -> None:
        for name in ("target_modules", "full_modules"):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"lora.{name}[{i}]", f"not a regex ({err}): {pattern!r}") from None
        if self.enabled:
            _check(bool(self.target_modules), "lora.target_modules", "is empty: no module would get adapters")


def check_quantize(cfg: Mapping, at_run_time: bool) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes: refuse before any model loads."""
    lora = cfg.get("lora") or {}
    if not (lora.get("enabled") and lora.get("quantize")):
        return
    accelerator = cfg["trainer"].get("accelerator")
    _check(
        accelerator != "cpu",
        "lora.quantize",
        f"{lora['quantize']} (QLoRA) needs a CUDA GPU, but trainer.accelerator is cpu: set lora.quantize=null",
    )
    if not at_run_time:
        return
    import torch

    _check(
        torch.cuda.is_available(),
        "lora.quantize",
        f"{lora['quantize']} (QLoRA) needs a CUDA GPU and this machine has none: set lora.quantize=null",
    )
    _check(
        importlib.util.find_spec("bitsandbytes") is not None,
        "lora.quantize",
        f"{lora['quantize']} (QLoRA) needs bitsandbytes: pip install 'moe-tuning[qlora]'",
    )


@dataclass
class DataValidationConfig(Schema):
    """``data.validation``: how data preparation checks records."""

    section = "data.validation"
    image_check: str = rule("full", one_of=IMAGE_CHECKS)
    max_rejected_fraction: float = rule(0.05, ge=0, le=1)
    workers: int = rule(1, ge=1)


@dataclass
class DataStageConfig:
    """``data.stages.<stage>``: a stage's manifests and prompt format (values checked by DataConfig)."""

    template: str
    image_aspect: str = "pad"
    train: str | None = None
    val: str | None = None


@dataclass
class DataConfig(Schema):
    """Schema of ``conf/data/*.yaml``: an unknown key (a typo) or an impossible value names its key."""

    section = "data"
    name: str
    root: str
    stages: dict[str, DataStageConfig]
    image_folder: str | None = None
    tokenizer: str | None = None
    max_length: int | None = rule(None, gt=0)
    overlength: str = rule("reject", one_of=OVERLENGTH_POLICIES)
    leading_gpt: str = rule("reject", one_of=LEADING_GPT_POLICIES)
    pad_color: list[int] | None = None
    max_image_pixels: int = rule(40_000_000, gt=0)
    num_workers: int = rule(0, ge=0)
    validation: DataValidationConfig = field(default_factory=DataValidationConfig)
    eval: Any = None  # benchmark files: checked by the evaluation before the model loads
    generator: Any = None  # ShapesWorld generator settings (its own dataclass checks them)

    def check(self) -> None:
        prompts = [(f"data.stages.{name}", vars(stage)) for name, stage in self.stages.items()]
        if isinstance(self.eval, Mapping):
            prompts.append(("data.eval", self.eval))
        for key, node in prompts:
            template, aspect = node.get("template"), node.get("image_aspect")
            _check(
                template is None or template in TEMPLATES,
                f"{key}.template",
                f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}",
            )
            _check(
                aspect is None or aspect in ASPECT_MODES,
                f"{key}.image_aspect",
                f"must be one of {ASPECT_MODES}, got {aspect!r}",
            )
        color = self.pad_color
        _check(
            color is None or (len(color) == 3 and all(0 <= c <= 255 for c in color)),
            "data.pad_color",
            f"must be null or three 0-255 integers, got {color!r}",
        )


def structured(schema: type, node: Any, key: str):
    """``node`` as an instance of the dataclass ``schema``; errors name ``<key>.<field>``."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        raise ConfigError(full_key, str(err).split("\n")[0]) from None


def world_size(trainer_cfg: Mapping) -> int | None:
    """Data-parallel world size when the config fixes it (None for devices=-1/auto: known at run time)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
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


def validate_stage_config(cfg: Mapping[str, Any] | DictConfig, check_paths: bool = True) -> None:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if cfg.get("stage_overrides"):  # the old preset mechanism: say so rather than ignore the values
        raise ConfigError(
            "stage_overrides",
            "removed: an experiment's per-stage values are conf/stage_preset/<experiment>/<stage>.yaml, "
            "and stage.<key>=... on the command line wins over them",
        )
    stage = structured(StageConfig, cfg.stage, "stage")
    if not cfg.get("train_modules"):
        groups = stage.trainable
        _check(
            bool(groups) and all(g in TRAINABLE_GROUPS for g in groups),
            "stage.trainable",
            f"expected a non-empty list of {TRAINABLE_GROUPS}, got {list(groups)}",
        )
    world = world_size(cfg.trainer)
    if world is not None:
        accumulation_steps(cfg.stage, world)
    structured(MoEConfig, cfg.moe, "moe")
    structured(LoraConfig, cfg.get("lora") or {}, "lora")
    check_quantize(cfg, at_run_time=check_paths)
    # resolved first: the data group's interpolations (${data.root}/...) refer to the root config
    structured(DataConfig, OmegaConf.to_container(cfg.data, resolve=True), "data")
    _validate_model(cfg.model)
    _validate_trainer(cfg.trainer)
    _check(
        cfg.get("resume", "auto") in ("auto", "never"),
        "resume",
        f"expected auto or never, got {cfg.get('resume')!r}",
    )
    export = cfg.get("export") or {}
    dtype = str(export.get("dtype", "auto"))
    _check(dtype in EXPORT_DTYPES, "export.dtype", f"expected one of {EXPORT_DTYPES}, got {dtype!r}")
    shard = export.get("max_shard_size", "5GB")
    _check(
        (isinstance(shard, int) and not isinstance(shard, bool) and shard > 0)
        or (isinstance(shard, str) and re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", shard) is not None),
        "export.max_shard_size",
        f"expected a byte count or a size such as 5GB, got {shard!r}",
    )
    if check_paths:
        _validate_paths(cfg, stage.name)


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


def _literal_values(tp: Any) -> set[str]:
    args = typing.get_args(tp)
    return {str(a) for arg in args for a in (_literal_values(arg) or {arg})} if args else set()


def _validate_trainer(trainer: Mapping) -> None:
    """The names Lightning accepts, from Lightning (its registries and its precision type)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    precisions = _literal_values(_PRECISION_INPUT)
    precision = str(trainer.get("precision", "32-true"))
    _check(
        precision in precisions,
        "trainer.precision",
        f"expected one of {sorted(precisions)}, got {precision!r}",
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
