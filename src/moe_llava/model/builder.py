"""Build an ``MoELlavaForCausalLM`` (and its image processor) from a model recipe (``conf/model/*.yaml``).

A recipe names each tower by hub id or local directory (``name_or_path``) and/or by explicit
``transformers`` config values (``config``). With ``pretrained=True`` the weights come from
``name_or_path`` through the towers' own ``from_pretrained`` and the checkpoint's config wins: the
tower's class comes from it (a SigLIP checkpoint builds a SigLIP tower whatever the recipe's
model_type), and a recipe ``config`` value that disagrees with it is a
:class:`~moe_llava.errors.ConfigError` naming the key (:func:`checkpoint_config`), never silently
ignored. Otherwise the towers are built from ``config`` (randomly initialised, or on the ``meta``
device for counting parameters without downloads).

Checkpoint code never runs: every ``from_pretrained`` passes ``trust_remote_code=False`` (explicitly:
the library's default, None, asks on an interactive terminal). Weights load the library's way:
safetensors, or a ``.bin`` through ``torch.load(weights_only=True)``, which unpickles no code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.tokenizer import ensure_image_token
from moe_llava.errors import ConfigError, UserError
from moe_llava.model.modeling import MoELlavaForCausalLM
from moe_llava.paths import is_local_path

# Vision towers by config `model_type`: full CLIP/SigLIP checkpoints load their vision half.
VISION_TOWER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


def _as_dict(value: Mapping | DictConfig | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value)


def tower_config(spec: Mapping, role: str) -> PreTrainedConfig:
    """The ``transformers`` config of a tower spec: explicit values, else the checkpoint's own."""
    spec = _as_dict(spec)
    values = _as_dict(spec.get("config"))
    if values:
        if "model_type" not in values:
            raise UserError(f"model.{role}.config needs a model_type (e.g. clip_vision_model, llama, phi)")
        values = dict(values)
        model_type = values.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise UserError(f"model.{role}.config.model_type={model_type!r}: {err}") from err
    if spec.get("name_or_path"):
        return AutoConfig.from_pretrained(spec["name_or_path"], trust_remote_code=False)
    raise UserError(f"model.{role} needs name_or_path or config")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _base_type(model_type: str) -> str:
    return model_type.removesuffix("_vision_model")  # a full CLIP/SigLIP checkpoint holds the tower


def checkpoint_config(spec: Mapping, role: str) -> PreTrainedConfig:
    """The config of ``spec``'s checkpoint (``name_or_path``; its vision half for a full CLIP/SigLIP),
    after checking every recipe ``config`` value against it. Reads config.json only (no weights).

    Raises :class:`ConfigError` naming ``model.<role>.config.<key>`` for a disagreeing value, and
    ``model.<role>.name_or_path`` for a checkpoint whose config cannot be read.
    """
    spec = _as_dict(spec)
    path = spec.get("name_or_path")
    if is_local_path(path) and not Path(path).expanduser().exists():
        raise ConfigError(f"model.{role}.name_or_path", f"{path} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.{role}.name_or_path", f"cannot read the config of {path}: {first}"
        ) from None
    if role == "vision_tower":
        config = getattr(config, "vision_config", config)
    for key, value in _as_dict(spec.get("config")).items():
        name = f"model.{role}.config.{key}"
        if key == "model_type":
            actual = getattr(config, "model_type", None)
            agree = actual is not None and _base_type(str(value)) == _base_type(actual)
        else:
            actual = getattr(config, key, None)
            agree = hasattr(config, key) and _same(value, actual)
        if not agree:
            raise ConfigError(
                name,
                f"{value!r} disagrees with {path}'s config ({actual!r}); with model.pretrained=true the "
                f"checkpoint's config wins: drop the value (model.{role}.config=null takes all of the "
                "checkpoint's), or build from the recipe's values with model.pretrained=false",
            )
    return config


def _vision_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    try:
        return VISION_TOWER_CLASSES[config.model_type]
    except KeyError:
        raise UserError(
            f"model.vision_tower: unsupported vision model_type={config.model_type!r}; "
            f"supported: {sorted(VISION_TOWER_CLASSES)}"
        ) from None


def vision_config_of(spec: Mapping, pretrained: bool) -> PreTrainedConfig:
    """The vision tower's config a recipe builds: its checkpoint's (pretrained), else its values."""
    spec = _as_dict(spec)
    if pretrained and spec.get("name_or_path"):
        return checkpoint_config(spec, "vision_tower")
    config = tower_config(spec, "vision_tower")
    return getattr(config, "vision_config", config)  # full CLIP/SigLIP config -> vision half


def num_image_tokens_of(vision_config: PreTrainedConfig) -> int:
    """Visual tokens per image of a tower (as ``MoELlavaConfig.num_image_tokens``: one per patch)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def build_vision_tower(spec: Mapping, pretrained: bool, dtype=None) -> PreTrainedModel:
    spec = _as_dict(spec)
    vision_config = vision_config_of(spec, pretrained)
    cls = _vision_class(vision_config)  # the checkpoint's own class when pretrained
    if pretrained and spec.get("name_or_path"):
        return cls.from_pretrained(spec["name_or_path"], dtype=dtype, trust_remote_code=False)
    return cls._from_config(vision_config, dtype=dtype)


def build_language_model(spec: Mapping, pretrained: bool, dtype=None, tokenizer=None) -> PreTrainedModel:
    spec = _as_dict(spec)
    if pretrained and spec.get("name_or_path"):
        checkpoint_config(spec, "language_model")  # the recipe's values agree with the checkpoint's
        model = AutoModelForCausalLM.from_pretrained(
            spec["name_or_path"], dtype=dtype, trust_remote_code=False
        )
    else:
        config = tower_config(spec, "language_model")
        if tokenizer is not None:  # a from-scratch LM gets exactly the tokenizer's vocabulary
            config.vocab_size = len(tokenizer)
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(tokenizer, name, None) is not None:
                    setattr(config, name, getattr(tokenizer, name))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def build_model(
    vision_tower: Mapping,
    language_model: Mapping,
    tokenizer=None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    image_token_id: int | None = None,
    **config_kwargs,
) -> MoELlavaForCausalLM:
    """Build the dense MoE-LLaVA model of a recipe.

    Args:
        vision_tower / language_model: ``{"name_or_path": ..., "config": {"model_type": ..., ...}}``.
        tokenizer: sets the image token id (adding ``<image>`` if needed) and sizes the vocabulary.
        pretrained: load weights from ``name_or_path`` where given (False: build from ``config``).
        device: e.g. ``"meta"`` to count parameters of a real recipe without allocating them.
        config_kwargs: other :class:`MoELlavaConfig` fields (vision_feature_layer, router_aux_loss_coef ...).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if tokenizer is not None:
        ensure_image_token(tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with torch.device(device) if device is not None else nullcontext():
        vision = build_vision_tower(vision_tower, pretrained, dtype)
        language = build_language_model(language_model, pretrained, dtype, tokenizer)
    if image_token_id is None:  # no tokenizer: reserve the last row of the vocabulary
        image_token_id = language.get_input_embeddings().num_embeddings - 1
    return MoELlavaForCausalLM.from_components(
        vision, language, image_token_id=image_token_id, **config_kwargs
    )


def build_image_processor(vision_tower: Mapping, pretrained: bool = True):
    # The PIL processors: the default (fast) ones need torchvision, which has no CPU-only wheel to pin.
    """The vision tower's own ``transformers`` image processor (from the checkpoint, or matching ``config``)."""
    spec = _as_dict(vision_tower)
    if pretrained and spec.get("name_or_path"):
        return AutoImageProcessor.from_pretrained(spec["name_or_path"], trust_remote_code=False)
    config = tower_config(spec, "vision_tower")
    config = getattr(config, "vision_config", config)
    size = config.image_size
    if _vision_class(config) is SiglipVisionModel:
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
