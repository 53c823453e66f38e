"""Build data objects from the Hydra ``data`` config group (``conf/data/*.yaml``).

The group describes *what* the data is (paths, templates, aspect handling, limits); the model
supplies *how it is consumed* (tokenizer, image processor, ``num_image_tokens``), so those are
arguments here. ``cfg`` is the ``data`` node (``cfg.data`` of the composed root config) or a plain
mapping with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.prepare import PrepareResult, prepare_manifest
from moe_llava.data.validation import Validator
from moe_llava.errors import UserError

STAGES = ("stage1", "stage2", "stage3")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):  # dict, DictConfig
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def stage_config(cfg: Any, stage: str) -> Any:
    stages = _get(cfg, "stages") or {}
    node = _get(stages, stage)
    if node is None:
        raise UserError(
            f"data config {_get(cfg, 'name', '?')!r} has no stage {stage!r} (stages: {list(stages)})"
        )
    return node


def stage_manifest(cfg: Any, stage: str, split: str = "train") -> str | None:
    """Path of a stage's ``train`` or ``val`` manifest (None when the config has none)."""
    value = _get(stage_config(cfg, stage), split)
    return None if value is None else str(value)


def tokenizer_from_config(cfg: Any, default: str | Path | None = None) -> Any:
    """The dataset's own tokenizer (ShapesWorld) or ``default`` (the backbone's name/path)."""
    from moe_llava.data.tokenizer import load_tokenizer

    path = _get(cfg, "tokenizer") or default
    if path is None:
        raise UserError("the data config has no tokenizer and no default (backbone) tokenizer was given")
    return load_tokenizer(path)


def validator_from_config(
    cfg: Any, stage: str, *, tokenizer: Any = None, num_image_tokens: int = 1
) -> Validator:
    node = stage_config(cfg, stage)
    validation = _get(cfg, "validation") or {}
    return Validator(
        image_folder=_get(cfg, "image_folder"),
        tokenizer=tokenizer,
        template=_get(node, "template") if tokenizer is not None else None,
        max_length=_get(cfg, "max_length"),
        num_image_tokens=num_image_tokens,
        max_image_pixels=int(_get(cfg, "max_image_pixels", 40_000_000)),
        image_check=_get(validation, "image_check", "full"),
        overlength=_get(cfg, "overlength", "reject"),
        leading_gpt=_get(cfg, "leading_gpt", "reject"),
    )


def prepare_stage(
    cfg: Any,
    stage: str,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    num_image_tokens: int = 1,
    split: str = "train",
    progress: bool = False,
) -> PrepareResult:
    """Validate a stage's manifest into ``out_dir`` (cleaned manifest, quarantine, counts)."""
    manifest = stage_manifest(cfg, stage, split)
    if manifest is None:
        raise UserError(f"stage {stage!r} has no {split!r} manifest")
    validation = _get(cfg, "validation") or {}
    return prepare_manifest(
        manifest,
        out_dir,
        validator_from_config(cfg, stage, tokenizer=tokenizer, num_image_tokens=num_image_tokens),
        max_rejected_fraction=float(_get(validation, "max_rejected_fraction", 0.05)),
        workers=int(_get(validation, "workers", 1)),
        progress=progress,
    )


def dataset_from_config(
    cfg: Any,
    stage: str,
    *,
    tokenizer: Any,
    image_processor: Any,
    num_image_tokens: int,
    split: str = "train",
    manifest: str | Path | None = None,
    **overrides: Any,
) -> LlavaDataset:
    """A :class:`LlavaDataset` for a stage; ``manifest`` overrides the config's (e.g. a prepared one)."""
    node = stage_config(cfg, stage)
    manifest = manifest or stage_manifest(cfg, stage, split)
    if manifest is None:
        raise UserError(f"stage {stage!r} has no {split!r} manifest")
    kwargs = _dataset_kwargs(cfg, node, image_processor, num_image_tokens)
    kwargs.update(
        overlength=_get(cfg, "overlength", "reject"),
        max_image_pixels=int(_get(cfg, "max_image_pixels", 40_000_000)),
    )
    kwargs.update(overrides)
    return LlavaDataset(manifest, tokenizer, **kwargs)


def eval_dataset_from_config(
    cfg: Any,
    manifest: str | Path,
    *,
    tokenizer: Any,
    image_processor: Any,
    num_image_tokens: int,
    **overrides: Any,
) -> LlavaDataset:
    """A generation-mode dataset (POPE/VQA files carry LLaVA ``conversations``) with the eval settings."""
    node = _get(cfg, "eval") or {}
    kwargs = _dataset_kwargs(cfg, node, image_processor, num_image_tokens)
    kwargs.update(generation=True, **overrides)
    return LlavaDataset(manifest, tokenizer, **kwargs)


def _dataset_kwargs(cfg: Any, node: Any, image_processor: Any, num_image_tokens: int) -> dict[str, Any]:
    """LlavaDataset settings shared by training and evaluation; ``node`` holds template and aspect."""
    pad_color = _get(cfg, "pad_color")
    return {
        "template": _get(node, "template", "phi"),
        "image_processor": image_processor,
        "image_folder": _get(cfg, "image_folder"),
        "num_image_tokens": num_image_tokens,
        "max_length": _get(cfg, "max_length"),
        "image_aspect": _get(node, "image_aspect", "pad"),
        "pad_color": None if pad_color is None else [int(c) for c in pad_color],
    }
