"""`MoELlavaConfig`: vision tower + projector + language model (+ the MoE layout once upcycled)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from moe_llava.constants import MODEL_TYPE

PROJECTOR_TYPES = ("mlp2x_gelu",)


class MoELlavaConfig(PreTrainedConfig):
    """Configuration of :class:`~moe_llava.model.modeling.MoELlavaForCausalLM`.

    Args:
        vision_config: a CLIP or SigLIP vision config (or its dict).
        text_config: any decoder-only causal-LM config (or its dict with ``model_type``).
        image_token_id: id of the ``<image>`` token; each image occupies ``num_image_tokens``
            consecutive positions holding this id.
        vision_feature_layer: hidden layer of the vision tower whose patch features are used (-2 =
            penultimate, as in LLaVA).
        projector_type: only ``mlp2x_gelu`` (Linear, GELU, Linear).
        router_aux_loss_coef / router_z_loss_coef: weights of the summed MoE losses in the total loss.
        moe: ``None`` for a dense model; after upcycling, the layout needed to rebuild it:
            ``{"num_experts", "top_k", "layers": [indices], **SparseMoeBlock kwargs}``.
        drop_first_patch: drop the first patch feature of a tower without a CLS token, as the
            released MoE-LLaVA SigLIP checkpoints were trained (728 of SigLIP-384's 729 patches);
            set by ``moe-llava model convert``.
        conversation_template / image_aspect / pad_color: how prompts and images must be prepared
            for this model (the settings of the data it was last trained on; set at each stage's
            export), so that evaluation, the MLflow model and ``moe-llava chat`` ask it the same way.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    moe: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    conversation_template: str = "phi"
    image_aspect: str = "pad"
    pad_color: list[int] | None = None
    drop_first_patch: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"projector_type={self.projector_type!r} is not supported; expected one of {PROJECTOR_TYPES}"
            )
        # Word-embedding tying is the language model's own business.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: one per patch (the CLS token, where the tower has one, is dropped;
        the first patch too with ``drop_first_patch``)."""
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches - 1 if self.drop_first_patch else patches
