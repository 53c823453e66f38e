"""Backbone pretraining for the embedded default: a pretrained vision tower and LM, made here.

The paper starts MoE-Tuning from a pretrained CLIP and a pretrained LLM. Weights cannot be
downloaded for the embedded ShapesWorld default, so this step makes its own, on the training
split only, with standard objectives and ``transformers`` classes:

* vision tower: ``CLIPForImageClassification``, multi-label object recognition (ImageNet-style
  supervised pretraining) on the training images' object annotations;
* language model: ``AutoModelForCausalLM``, next-token prediction on the training text.

Both are saved with ``save_pretrained`` and loaded by the model recipe through ``from_pretrained``
(``model.pretrained: true``), the path a GPU user takes with CLIP-L/336 and Phi-2.
Run it with ``python -m moe_llava.pretrain --config-dir params --config-name stage1`` (DVC stage
``backbones``); configured by the ``backbones`` config group.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "run_backbones": "moe_llava.pretrain.run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
