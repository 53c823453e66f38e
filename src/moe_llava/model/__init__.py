"""MoE-LLaVA model: sparse MoE block, generic upcycling, the vision-language model, parameter counts.

Modules: ``moe`` (the sparse MoE block, router statistics), ``upcycle``, ``configuration``,
``modeling``, ``builder`` (models from the Hydra ``model`` group), ``params`` (parameter counts),
``lora`` (LoRA / QLoRA adapters with peft, and merging them), ``cli`` (``moe-llava model``).
Importing the package registers the model with transformers' Auto classes, so
``AutoConfig.from_pretrained(dir)`` / ``AutoModelForImageTextToText.from_pretrained(dir)`` work on
our exports.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "MoELlavaConfig": "moe_llava.model.configuration",
    "MoELlavaForCausalLM": "moe_llava.model.modeling",
    "MoELlavaOutput": "moe_llava.model.modeling",
    "MultimodalProjector": "moe_llava.model.modeling",
    "ParameterCount": "moe_llava.model.params",
    "count_parameters": "moe_llava.model.params",
    "RouterStats": "moe_llava.model.moe",
    "SparseMoeBlock": "moe_llava.model.moe",
    "moe_blocks": "moe_llava.model.moe",
    "moe_losses": "moe_llava.model.moe",
    "set_routing_masks": "moe_llava.model.moe",
    "find_decoder_layers": "moe_llava.model.upcycle",
    "resolve_moe_layers": "moe_llava.model.upcycle",
    "upcycle_to_moe": "moe_llava.model.upcycle",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from moe_llava.model.configuration import MoELlavaConfig
    from moe_llava.model.modeling import MoELlavaForCausalLM

    AutoConfig.register(MoELlavaConfig.model_type, MoELlavaConfig, exist_ok=True)
    AutoModelForImageTextToText.register(MoELlavaConfig, MoELlavaForCausalLM, exist_ok=True)


_register_auto_classes()
