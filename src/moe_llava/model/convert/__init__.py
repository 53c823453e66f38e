"""Converting the released MoE-LLaVA checkpoints (LanguageBind/MoE-LLaVA-*) to our exports and back.

Modules, one concern each: :mod:`.layout` (weight files: the released shards read tensor by
tensor, safetensors shards written the same way), :mod:`.keymaps` (state-dict names per backbone),
:mod:`.configmap` (config.json fields), :mod:`.tokenizer` (tiktoken vocabularies -> fast
tokenizers), :mod:`.released` (released -> ours) and :mod:`.reference` (ours -> released).
``moe-llava model convert`` is the command (:mod:`moe_llava.model.cli`).
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "ConversionReport": "moe_llava.model.convert.released",
    "convert_released": "moe_llava.model.convert.released",
    "convert_to_reference": "moe_llava.model.convert.reference",
    "is_released_checkpoint": "moe_llava.model.convert.configmap",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
