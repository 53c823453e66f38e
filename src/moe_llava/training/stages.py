"""What a stage trains and where its weights come from: configuration, not code forks.

* Stage 1 builds the model from its recipe; stages 2 and 3 load the previous stage's
  ``save_pretrained`` export (or any ``init_from`` directory).
* Stage 3 upcycles the loaded model unless it already is an MoE model, which is how MoE-tuning
  continues from a released or previously trained MoE checkpoint.
* The trainable set is a list of groups (``projector``, ``vision_tower``, ``language_model``,
  ``ffn``), or regexes over parameter names (``train_modules``); everything else is frozen.
* With ``lora.enabled`` the set trains through LoRA adapters instead (:func:`apply_stage_lora`,
  after upcycling): adapters on the targeted linears inside it, its ``full_modules`` in full,
  the rest of it frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from moe_llava.errors import ConfigError
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.model.checkpoint import load_export_model
from moe_llava.model.lora import LoraSettings, apply_lora
from moe_llava.model.upcycle import find_decoder_layers, find_ffn_name

STAGES = ("stage1", "stage2", "stage3")
TRAINABLE_GROUPS = ("projector", "vision_tower", "language_model", "ffn")


def previous_stage(stage: str) -> str | None:
    index = STAGES.index(stage)
    return STAGES[index - 1] if index > 0 else None


def group_parameter_names(model: MoELlavaForCausalLM, group: str) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters of one trainable group."""
    if group in ("projector", "language_model"):
        return {f"{group}.{name}" for name, _ in getattr(model, group).named_parameters()}
    if group == "vision_tower":  # minus the layers after the feature layer: they never get a gradient
        names = {f"vision_tower.{name}" for name, _ in model.vision_tower.named_parameters()}
        return names - model.unused_vision_parameter_names()
    if group == "ffn":  # every decoder layer's FFN: MoE experts + routers, and the dense FFNs of the rest
        layer_names = {id(layer): name for name, layer in model.language_model.named_modules()}
        names = set()
        for layer in find_decoder_layers(model.language_model):
            ffn_name = find_ffn_name(layer)
            prefix = f"language_model.{layer_names[id(layer)]}.{ffn_name}"
            names |= {f"{prefix}.{name}" for name, _ in getattr(layer, ffn_name).named_parameters()}
        return names
    raise ConfigError("stage.trainable", f"unknown group {group!r}; expected some of {TRAINABLE_GROUPS}")


def configure_trainable(
    model: MoELlavaForCausalLM, groups: Iterable[str] = (), patterns: Sequence[str] | None = None
) -> list[str]:
    """Freeze everything, then unfreeze ``groups`` (or, when given, parameters matching ``patterns``).

    Returns the sorted names of the trainable parameters.
    """
    all_names = [name for name, _ in model.named_parameters()]
    if patterns:
        trainable = set()
        for pattern in patterns:
            matched = {name for name in all_names if re.search(pattern, name)}
            if not matched:
                raise ConfigError("train_modules", f"pattern {pattern!r} matches no parameter")
            trainable |= matched
    else:
        trainable = (
            set().union(*(group_parameter_names(model, group) for group in groups)) if groups else set()
        )
    if not trainable:
        key = "train_modules" if patterns else "stage.trainable"
        raise ConfigError(key, "selects no parameter: nothing would train")
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sorted(trainable)


def load_stage_model(
    stage: str,
    init_dir: str | Path | None,
    build_from_recipe,
    upcycle: bool,
    moe_settings: dict | None = None,
) -> tuple[MoELlavaForCausalLM, str]:
    """The model a stage starts from, and a one-line description of where it came from.

    ``build_from_recipe`` is a zero-argument callable building the dense recipe model (stage 1,
    or any stage without ``init_dir``).
    """
    if init_dir is None:
        model, origin = build_from_recipe(), "built from the model recipe"
    else:
        model, origin = load_export_model(init_dir), f"loaded from {init_dir}"
    if upcycle:
        if model.is_moe:
            origin += " (already MoE: continuing MoE-tuning, no upcycling)"
        else:
            layers = model.upcycle(**(moe_settings or {}))
            origin += f", upcycled layers {layers}"
    return model, origin


def split_moe_settings(moe_cfg: dict) -> tuple[dict, dict]:
    """(upcycling kwargs, MoELlavaConfig loss coefficients) from the ``moe`` config group."""
    settings = dict(moe_cfg)
    coefficients = {
        key: settings.pop(key) for key in ("router_aux_loss_coef", "router_z_loss_coef") if key in settings
    }
    return settings, coefficients


def apply_stage_lora(model: MoELlavaForCausalLM, lora_cfg, trainable: Iterable[str], fresh_routers: bool):
    """LoRA adapters on ``model`` as the ``lora`` group says (None when it is off): the
    :class:`peft.PeftModel` around the model, which is adapted in place.

    ``fresh_routers``: the routers were made by this stage's upcycling. An adapter export (and
    QLoRA's merge, which rebuilds the base in full precision) can only give them back when they
    are in the adapter export, so then they must be among ``lora.full_modules``.
    """
    if not lora_cfg or not lora_cfg.get("enabled"):
        return None
    settings = LoraSettings.from_config(lora_cfg)
    peft_model = apply_lora(model, settings, set(trainable))
    rebuilt = lora_cfg.get("export") == "adapter" or settings.quantize
    if rebuilt and fresh_routers:
        unsaved = [
            name
            for name, module in model.named_modules()
            if name.endswith(".router") and type(module).__name__ != "ModulesToSaveWrapper"
        ]
        if unsaved:
            raise ConfigError(
                "lora.full_modules",
                f"must train the routers this stage upcycled ({unsaved[0]}, ...) when lora.export=adapter or "
                "lora.quantize is set: the adapter export is all a merge gets besides the dense base",
            )
    return peft_model
