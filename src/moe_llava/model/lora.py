"""LoRA (and QLoRA) adapters on a MoE-LLaVA model with ``peft``, and merging them back into a plain model.

The experts of an MoE block are separate modules holding the dense FFN's own ``nn.Linear``s
(:mod:`moe_llava.model.moe.experts`), so ``peft``'s LoRA targets them like any linear layer:
``language_model.model.layers.0.mlp.experts.2.up_proj`` gets its own ``lora_A``/``lora_B``, and
the experts, identical copies right after upcycling, diverge through their adapters. Targets are
regexes over module names (``re.search``), like ``train_modules``; each is resolved to the exact
names of the ``nn.Linear``s it matches before ``peft`` sees it, so a pattern that matches nothing,
or matches something that is not a plain linear (a router), is a one-line error naming the key.

Modules that train fully beside the adapters (``full_modules``: the projector, the routers) are
``peft``'s ``modules_to_save``: a trainable copy that an adapter export carries, so that merging
an adapter export into its base gives the trained projector and routers back.

``peft`` injects the adapters in place: the model keeps its class, forward and parameter names
(plus ``base_layer`` / ``lora_A.default`` ... parts), so training, checkpoints, DDP and the
per-part learning rates work on it unchanged; the :class:`peft.PeftModel` around it is only used
to merge and to save.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_llava.errors import CheckpointError, ConfigError
from moe_llava.model.checkpoint import ADAPTER_CONFIG
from moe_llava.model.moe import moe_blocks

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# An adapter export's record of the trained model's config (MoE layout, prompt format, loss
# coefficients): what merging needs besides the base export. Not config.json, so that nothing
# takes an adapter folder for a model export.
TRAINED_CONFIG = "moe_llava_config.json"
QUANTIZE_MODES = ("nf4",)
# Config keys a merge takes from the base export, not from the adapters' record.
KEPT_FROM_BASE = frozenset(
    {"vision_config", "text_config", "moe", "architectures", "transformers_version", "dtype"}
)


@dataclass(frozen=True)
class LoraSettings:
    """The ``lora`` config group (checked by :class:`moe_llava.training.validation.LoraConfig`)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()
    full_modules: tuple[str, ...] = ()
    quantize: str | None = None

    @classmethod
    def from_config(cls, node: Any) -> LoraSettings:
        return cls(
            r=int(node["r"]),
            alpha=float(node["alpha"]),
            dropout=float(node["dropout"]),
            target_modules=tuple(node.get("target_modules") or ()),
            full_modules=tuple(node.get("full_modules") or ()),
            quantize=node.get("quantize"),
        )


def resolve_targets(
    model: nn.Module, settings: LoraSettings, trainable: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """(adapter targets, fully trained modules): exact module names, checked.

    ``trainable``: parameter names the stage may train (``stage.trainable`` / ``train_modules``);
    a target or full module outside it is an error, so LoRA narrows what a stage trains, never widens it.
    """
    modules = dict(model.named_modules())
    targets: list[str] = []
    for pattern in settings.target_modules:
        matched = [name for name in modules if name and re.search(pattern, name)]
        if not matched:
            raise ConfigError("lora.target_modules", f"pattern {pattern!r} matches no module")
        for name in matched:
            if type(modules[name]) is not nn.Linear:
                raise ConfigError(
                    "lora.target_modules",
                    f"pattern {pattern!r} matches {name} ({type(modules[name]).__name__}), not an nn.Linear"
                    + ("; train routers fully (lora.full_modules)" if "router" in name else ""),
                )
        targets += [name for name in matched if name not in targets]
    full: list[str] = []
    for pattern in settings.full_modules:
        matched = [name for name in modules if name and re.search(pattern, name)]
        if not matched:
            raise ConfigError("lora.full_modules", f"pattern {pattern!r} matches no module")
        full += [name for name in matched if name not in full]
    full = [name for name in full if not any(name.startswith(other + ".") for other in full)]  # outermost
    for name in full:
        inside = [t for t in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if inside:
            raise ConfigError(
                "lora.full_modules", f"{name} overlaps the adapter target {inside[0]} (lora.target_modules)"
            )
    if trainable is not None:
        for key, names in (("lora.target_modules", targets), ("lora.full_modules", full)):
            for name in names:
                params = {f"{name}.{p}" for p, _ in modules[name].named_parameters()}
                outside = sorted(params - trainable)
                if outside:
                    raise ConfigError(
                        key,
                        f"{name} is outside the stage's trainable set (stage.trainable / train_modules): "
                        f"{outside[0]} is frozen in this stage",
                    )
    return targets, full


def apply_lora(model: nn.Module, settings: LoraSettings, trainable: set[str] | None = None):
    """Inject LoRA adapters into ``model`` in place; returns the :class:`peft.PeftModel` around it.

    Afterwards only the adapters and the copies of ``full_modules`` require grad; everything else
    (the adapted linears' own weights included) is frozen.
    """
    from peft import LoraConfig, get_peft_model

    if settings.r < 1:
        raise ConfigError("lora.r", f"must be >= 1, got {settings.r}")
    targets, full = resolve_targets(model, settings, trainable)
    if settings.quantize:
        quantize_4bit(model, targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=full or None,
        bias="none",
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    wrapped = sorted(name for name, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper")
    if wrapped != sorted(full):  # peft matches modules_to_save by name suffix: make sure it took ours
        raise ConfigError("lora.full_modules", f"peft wrapped {wrapped}, expected {sorted(full)}")
    refresh_expert_layouts(model)
    return peft_model


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():  # peft asks transformers 5.24+ by its old, deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def refresh_expert_layouts(model: nn.Module) -> None:
    """Re-detect each MoE block's expert layout after its linears were wrapped or unwrapped: adapted
    experts run on the loop path, merged ones on grouped GEMMs again."""
    for name, block in moe_blocks(model):
        block.refresh_expert_layout()
        if block.expert_path == "grouped_mm" and block.experts.layout is None:
            raise ConfigError(
                "moe.expert_path",
                f"grouped_mm cannot run the LoRA-adapted experts of {name}; use auto or loop",
            )


def merge_lora(peft_model) -> nn.Module:
    """The adapters merged into their base weights (``merge_and_unload``), full modules replaced by
    their trained copies: a plain model with the base model's class and parameter names."""
    model = peft_model.merge_and_unload()
    refresh_expert_layouts(model)
    return model


def is_adapted(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def save_adapter(peft_model, folder: str | Path) -> None:
    """Adapters (and full modules) in the PEFT format, plus the trained model's config (:data:`TRAINED_CONFIG`)."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    base = peft_model.get_base_model()
    (folder / TRAINED_CONFIG).write_text(base.config.to_json_string(use_diff=False))


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path) -> nn.Module:
    """Load the export ``base_dir``, rebuild the trained layout (upcycle it as the adapter's model
    was), load the adapters of ``adapter_dir`` and merge them: the model a merged export holds."""
    from peft import PeftModel

    from moe_llava.model.checkpoint import load_export_model

    adapter_dir = Path(adapter_dir)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINED_CONFIG):
        if not (adapter_dir / file).is_file():
            # PEFT would fall back to unpickling adapter_model.bin: only safetensors are loaded
            raise CheckpointError(f"not an adapter export of this project (no {file})", file=adapter_dir)
    trained = json.loads((adapter_dir / TRAINED_CONFIG).read_text(encoding="utf-8"))
    base = load_export_model(base_dir)
    moe = trained.get("moe")
    if moe and not base.is_moe:
        settings = dict(moe)
        base.upcycle(**settings)
    elif (moe or None) != (base.config.moe or None):
        raise CheckpointError(
            f"the adapters were trained on MoE layout {moe}, the base has {base.config.moe}", file=base_dir
        )
    current = base.config.to_dict()
    for key, value in trained.items():  # prompt format and loss coefficients of the trained model
        if key not in KEPT_FROM_BASE and value != current.get(key):
            setattr(base.config, key, value)
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"the adapters do not fit the base model ({str(err).splitlines()[0]})", file=adapter_dir
        ) from None
    return merge_lora(peft_model)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per part (``projector``, ``vision_tower``, ``routers``, ``experts``,
    ``ffn`` (dense FFNs), ``language_model`` (the rest)) and kind (``full`` / ``lora``), plus totals.

    Keys: ``<part>.<kind>``, ``total`` (trainable) and ``frozen``; parts with nothing trainable are left out.
    """
    counts: dict[str, int] = {}
    frozen = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not param.requires_grad:
            frozen += param.numel()
            continue
        key = f"{parameter_part(name)}.{'lora' if '.lora_' in name else 'full'}"
        counts[key] = counts.get(key, 0) + param.numel()
    return {**dict(sorted(counts.items())), "total": sum(counts.values()), "frozen": frozen}


def parameter_part(name: str) -> str:
    top = name.split(".", 1)[0]
    if top != "language_model":
        return top
    if ".router." in name:
        return "routers"
    if ".experts." in name:
        return "experts"
    if re.search(r"\.(mlp|feed_forward|ffn)\.", name):
        return "ffn"
    return "language_model"


def quantize_4bit(model: nn.Module, names: Sequence[str]) -> None:
    """QLoRA: replace the adapted linears by ``bitsandbytes`` 4-bit (NF4) linears on the GPU, bf16 compute.

    CUDA only; the stage config is checked for a GPU and bitsandbytes before any model loads
    (:func:`moe_llava.training.validation.check_quantize`).
    """
    import bitsandbytes as bnb

    device = torch.device("cuda", torch.cuda.current_device())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.to(torch.bfloat16).cpu(), requires_grad=False, quant_type="nf4"
        ).to(device)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        setattr(parent, child, quantized)
