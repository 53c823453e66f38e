"""MoE-LLaVA model: sparse MoE block, generic upcycling, the vision-language model, parameter counts."""

from transformers import AutoConfig, AutoModelForImageTextToText

from moe_llava.model.configuration import MoELlavaConfig
from moe_llava.model.modeling import MoELlavaForCausalLM, MoELlavaOutput, MultimodalProjector
from moe_llava.model.moe import RouterStats, SparseMoeBlock, moe_blocks, moe_losses, set_routing_masks
from moe_llava.model.params import ParameterCount, count_parameters
from moe_llava.model.upcycle import find_decoder_layers, resolve_moe_layers, upcycle_to_moe

# `AutoConfig.from_pretrained(dir)` / `AutoModelForImageTextToText.from_pretrained(dir)` work on our exports.
AutoConfig.register(MoELlavaConfig.model_type, MoELlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(MoELlavaConfig, MoELlavaForCausalLM, exist_ok=True)

__all__ = [
    "MoELlavaConfig",
    "MoELlavaForCausalLM",
    "MoELlavaOutput",
    "MultimodalProjector",
    "ParameterCount",
    "RouterStats",
    "SparseMoeBlock",
    "count_parameters",
    "find_decoder_layers",
    "moe_blocks",
    "moe_losses",
    "resolve_moe_layers",
    "set_routing_masks",
    "upcycle_to_moe",
]
