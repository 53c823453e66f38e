"""Lightning strategy objects from the ``trainer`` config: Lightning's own strategies, nothing home-made.

The only addition is FSDP's auto-wrap policy ``decoder_layers``: every decoder layer (and vision
encoder layer) becomes one FSDP unit, so an MoE block, router and all experts, is sharded and
gathered as a whole and ranks that activate different experts cannot deadlock.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from moe_llava.model.upcycle import find_decoder_layers


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    classes = {type(find_decoder_layers(model.language_model)[0])}
    vision_layers = [m for m in model.vision_tower.modules() if type(m).__name__.endswith("EncoderLayer")]
    classes |= {type(m) for m in vision_layers}
    return classes


def build_strategy(strategy_cfg: Any, model: nn.Module) -> Any:
    """A Lightning strategy (name string, or instance built from a ``_target_`` mapping)."""
    if isinstance(strategy_cfg, str) or strategy_cfg is None:
        return strategy_cfg or "auto"
    spec: dict = (
        OmegaConf.to_container(strategy_cfg, resolve=True)
        if not isinstance(strategy_cfg, dict)
        else dict(strategy_cfg)
    )
    if spec.get("auto_wrap_policy") == "decoder_layers":
        spec["auto_wrap_policy"] = layer_classes(model)
    return instantiate(spec)


def is_checkpoint_io_compatible(strategy: Any) -> bool:
    """Whether our single-file atomic CheckpointIO applies (DeepSpeed/FSDP write sharded checkpoints)."""
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    return not any(key in str(name).lower() for key in ("deepspeed", "fsdp"))
