"""Everything a stage can fail on, checked before its model loads and before its MLflow run starts.

The config's values (:mod:`moe_llava.training.validation`) and the tracking server are checked
first; then, here, what needs the environment or the files:

* the Trainer: its strategy can be built (DeepSpeed installed for ``deepspeed_stage_2``, ...), the
  accelerator exists (a GPU for ``accelerator: gpu``) with enough devices;
* where the weights come from: an ``init_from`` / previous export is one of this project's exports
  with readable safetensors (:func:`~moe_llava.model.checkpoint.check_export`); a pretrained
  recipe's checkpoints have configs that agree with the recipe
  (:func:`~moe_llava.model.builder.checkpoint_config`);
* the tokenizer and image processor load;
* the data: the stage's manifests are validated and prepared (quarantine, repairs, counts), and a
  rejected fraction over ``data.validation.max_rejected_fraction`` stops the stage here.

Each failure is a ``ValueError`` kind (:class:`~moe_llava.errors.ConfigError`,
:class:`~moe_llava.errors.CheckpointError`, :class:`~moe_llava.errors.DataError`) that
``python -m moe_llava.train`` reports as one line, exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_llava.errors import ConfigError


@dataclass
class Prepared:
    """What the checks loaded, for the stage to use: the tokenizer, the image processor, and the
    number of image tokens of the model the stage is about to load."""

    tokenizer: Any
    image_processor: Any
    num_image_tokens: int


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_trainer(trainer_cfg: DictConfig) -> None:
    """The strategy can be built here and the accelerator (and its device count) exists."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    strategy = trainer_cfg.get("strategy", "auto")
    if OmegaConf.is_dict(strategy) or isinstance(strategy, dict):
        spec = (
            OmegaConf.to_container(strategy, resolve=True)
            if OmegaConf.is_config(strategy)
            else dict(strategy)
        )
        spec.pop("auto_wrap_policy", None)  # resolved from the model later (strategies.build_strategy)
        try:
            instantiate(spec)
        except (InstantiationException, ImportError, RuntimeError, ValueError) as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
            raise ConfigError(
                "trainer.strategy", f"{spec.get('_target_')} cannot be used here: {_first_line(cause)}"
            ) from None
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            raise ConfigError(
                "trainer.accelerator",
                f"{accelerator}, but no CUDA GPU is visible here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use trainer=cpu, or install the CUDA torch build",
            )
        devices = trainer_cfg.get("devices", 1)
        if isinstance(devices, int) and devices > available:
            raise ConfigError("trainer.devices", f"{devices} GPUs asked for, {available} visible")


def _load_tokenizer(path: Any, key: str):
    from moe_llava.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(key, f"cannot load a tokenizer from {path}: {_first_line(err)}") from None


def _load_image_processor(loader, key: str, where: Any):
    try:
        return loader()
    except (OSError, ValueError) as err:
        raise ConfigError(key, f"cannot load the image processor of {where}: {_first_line(err)}") from None


def check_sources(cfg: DictConfig, init_dir: Path | None) -> Prepared:
    """Where the stage's weights, tokenizer and image processor come from: checked and loaded
    (configs and processors only; no weights)."""
    from moe_llava.model.builder import (
        build_image_processor,
        checkpoint_config,
        num_image_tokens_of,
        vision_config_of,
    )

    if init_dir is not None:
        from transformers import AutoImageProcessor

        from moe_llava.model.checkpoint import check_export
        from moe_llava.model.configuration import MoELlavaConfig

        check_export(init_dir)  # CheckpointError naming the file
        config = MoELlavaConfig.from_pretrained(str(init_dir))
        tokenizer = _load_tokenizer(init_dir, "init_from")
        processor = _load_image_processor(
            lambda: AutoImageProcessor.from_pretrained(str(init_dir), trust_remote_code=False),
            "init_from",
            init_dir,
        )
        return Prepared(tokenizer, processor, config.num_image_tokens)

    model = cfg.model
    pretrained = bool(model.get("pretrained", True))
    vision = vision_config_of(model.vision_tower, pretrained)
    language = model.language_model
    if pretrained and language.get("name_or_path"):
        checkpoint_config(language, "language_model")
    key = "data.tokenizer" if cfg.data.get("tokenizer") else "model.language_model.name_or_path"
    source = cfg.data.get("tokenizer") or language.get("name_or_path")
    if not source:
        raise ConfigError(
            "data.tokenizer", "no tokenizer: set data.tokenizer or model.language_model.name_or_path"
        )
    tokenizer = _load_tokenizer(source, key)
    processor = _load_image_processor(
        lambda: build_image_processor(model.vision_tower, pretrained=pretrained),
        "model.vision_tower.name_or_path",
        model.vision_tower.get("name_or_path") or "the recipe",
    )
    return Prepared(tokenizer, processor, num_image_tokens_of(vision))


def preflight(cfg: DictConfig, init_dir: Path | None, data_dir: Path, *, prepare_data: bool) -> Prepared:
    """All the checks above, in order of cost; ``prepare_data``: this process prepares the data
    (rank 0; the other ranks find it prepared)."""
    from moe_llava.training.datamodule import prepare_splits

    check_trainer(cfg.trainer)
    prepared = check_sources(cfg, init_dir)
    if prepare_data:
        prepare_splits(
            cfg.data,
            str(cfg.stage.name),
            data_dir,
            tokenizer=prepared.tokenizer,
            num_image_tokens=prepared.num_image_tokens,
        )
    return prepared
