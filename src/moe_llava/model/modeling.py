"""`MoELlavaForCausalLM`: frozen-able vision tower -> mlp2x_gelu projector -> any causal LM (dense or upcycled).

Read top to bottom: the projector, the output type, then the model. Images enter as
``pixel_values``; the text holds ``num_image_tokens`` copies of ``image_token_id`` per image
(the data pipeline expands each ``<image>`` placeholder), and those positions' embeddings are
replaced by the projected patch features of the vision tower's ``vision_feature_layer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from moe_llava.constants import IGNORE_INDEX
from moe_llava.model.configuration import MoELlavaConfig
from moe_llava.model.moe import moe_blocks, moe_losses, router_losses_disabled, set_routing_masks
from moe_llava.model.upcycle import upcycle_to_moe


class MultimodalProjector(nn.Module):
    """LLaVA's ``mlp2x_gelu``: Linear(vision -> d_model), GELU, Linear(d_model -> d_model)."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


@dataclass
class MoELlavaOutput(CausalLMOutputWithPast):
    """The language model's own output type, plus the loss parts.

    ``loss`` = ``lm_loss`` + aux_coef * ``aux_loss`` + z_coef * ``z_loss`` (MoE parts are None when
    dense). Every other field (logits, the KV cache, hidden states, ...) is the installed
    ``transformers``' ``CausalLMOutputWithPast`` field, filled from the language model's output, so
    a field the library renames or adds reaches callers under the library's name.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


_LM_FIELDS = frozenset(f.name for f in fields(CausalLMOutputWithPast)) - {"loss"}


class MoELlavaForCausalLM(PreTrainedModel):
    config_class = MoELlavaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # The routers are evaluated in fp32; loading a bf16 model keeps them there.
    _keep_in_fp32_modules = ["router"]

    def __init__(self, config: MoELlavaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = MultimodalProjector(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.moe is not None:  # rebuild the upcycled layout so saved expert weights load 1:1
            moe = dict(config.moe)
            upcycle_to_moe(self.language_model, **moe)
        self.post_init()

    # ------------------------------------------------------------------ structure
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def is_moe(self) -> bool:
        return self.config.moe is not None

    @classmethod
    def from_components(
        cls, vision_tower: PreTrainedModel, language_model: PreTrainedModel, **config_kwargs
    ) -> MoELlavaForCausalLM:
        """Assemble a model around already-built (e.g. pretrained) towers without copying their weights.

        The skeleton is built on the meta device, so nothing is allocated or initialised twice;
        only the projector is created fresh.
        """
        config = MoELlavaConfig(
            vision_config=vision_tower.config, text_config=language_model.config, **config_kwargs
        )
        if config.moe is not None:
            raise ValueError("from_components builds a dense model; call .upcycle() afterwards")
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower = vision_tower
        model.language_model = language_model
        model.projector = MultimodalProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size
        ).to(device=language_model.device, dtype=language_model.dtype)
        return model

    def upcycle(self, num_experts: int = 4, top_k: int = 2, layers="sparse", **moe_kwargs) -> list[int]:
        """Upcycle the language model's FFNs (see :func:`upcycle_to_moe`) and record the layout in the config."""
        if self.is_moe:
            raise ValueError("the model is already an MoE model (config.moe is set)")
        indices = upcycle_to_moe(
            self.language_model, num_experts=num_experts, top_k=top_k, layers=layers, **moe_kwargs
        )
        self.config.moe = {"num_experts": num_experts, "top_k": top_k, "layers": indices, **moe_kwargs}
        return indices

    def _init_weights(self, module: nn.Module) -> None:
        # Our own modules only; the vision tower and LM are PreTrainedModels and init themselves.
        super()._init_weights(module)
        if isinstance(module, MultimodalProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.kaiming_uniform_(linear.weight, a=5**0.5)  # torch's Linear default, as LLaVA
                nn.init.zeros_(linear.bias)

    # ------------------------------------------------------------------ inputs
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_image_tokens, d_model) projected patch features."""
        pixel_values = pixel_values.to(dtype=self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]
        # CLIP-style CLS token first (or, with drop_first_patch, the first patch): drop it
        if features.shape[1] == self.num_image_tokens + 1:
            features = features[:, 1:]
        return self.projector(features)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image positions replaced by image features; also returns the image mask."""
        if image_mask is None:
            image_mask = input_ids == self.config.image_token_id
        image_mask = image_mask.bool()
        # The image id may lie outside a real backbone's vocabulary: never look it up.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        num_positions = int(image_mask.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if num_positions:
                raise ValueError(
                    f"input_ids hold {num_positions} image-token positions but pixel_values is None"
                )
            return self._keep_image_path_in_graph(embeds), image_mask
        expected = pixel_values.shape[0] * self.num_image_tokens
        if num_positions != expected:
            raise ValueError(
                f"input_ids hold {num_positions} image-token positions (id {self.config.image_token_id}) but "
                f"{pixel_values.shape[0]} image(s) x {self.num_image_tokens} tokens = {expected} were expected"
            )
        features = self.encode_images(pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        return embeds, image_mask

    def _keep_image_path_in_graph(self, embeds: torch.Tensor) -> torch.Tensor:
        """Text-only training batches: add the image path's trainable parameters with weight 0.

        Batches are grouped by modality, so under data parallelism one rank may see images while
        another does not; this keeps the projector (and a trainable vision tower) in every rank's
        graph, as DDP without ``find_unused_parameters`` requires. The gradients it adds are zeros.
        """
        if not (self.training and torch.is_grad_enabled()):
            return embeds
        params = [
            p for p in (*self.vision_tower.parameters(), *self.projector.parameters()) if p.requires_grad
        ]
        if not params:
            return embeds
        return embeds + 0.0 * torch.stack([p.sum() for p in params]).sum().to(embeds.dtype)

    def unused_vision_parameter_names(self) -> set[str]:
        """Vision-tower parameters that cannot affect the features used: the encoder layers after
        ``vision_feature_layer``, the final norm and any pooling head (named as in ``named_parameters``)."""
        num_layers = self.config.vision_config.num_hidden_layers
        feature_layer = self.config.vision_feature_layer
        first_unused = num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
        unused = set()
        for name, _ in self.vision_tower.named_parameters():
            layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if (layer and int(layer.group(1)) >= first_unused) or re.search(
                r"(?:^|\.)(post_layernorm|head)\.", name
            ):
                unused.add(f"vision_tower.{name}")
        return unused

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> MoELlavaOutput:
        """``lm_kwargs`` (position ids, the KV cache, ``use_cache``, ...) go to the language model
        as they are, under the names the installed ``transformers`` gives them."""
        embeds, image_mask = self.embed_inputs(input_ids, pixel_values, image_mask)
        set_routing_masks(self.language_model, attention_mask, image_mask)
        outputs = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **lm_kwargs)
        aux_loss, z_loss = moe_losses(self.language_model)
        lm_loss = loss = None
        if labels is not None:
            labels = labels.masked_fill(image_mask, IGNORE_INDEX)
            lm_loss = causal_lm_loss(outputs.logits, labels)
            loss = lm_loss
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * z_loss
        # Fields of a richer LM output type (e.g. an MoE LM's router logits) that the causal-LM
        # contract does not have are left out; our own MoE losses replace them.
        passed = {k: v for k, v in outputs.items() if k in _LM_FIELDS}
        return MoELlavaOutput(**passed, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with the language model's own ``generate`` (KV cache and all its strategies).

        Returns only the new tokens (batch, new_len). Batched prompts must be left-padded.
        Routing is deterministic: second-expert noise never applies outside training.
        """
        embeds, image_mask = self.embed_inputs(input_ids, pixel_values, image_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        set_routing_masks(self.language_model, attention_mask, image_mask)
        with router_losses_disabled(self.language_model):
            return self.language_model.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
            )

    def router_stats(self) -> dict[str, object]:
        """Per-MoE-layer :class:`RouterStats` of the latest forward, keyed by decoder layer name."""
        return {name: block.last_stats for name, block in moe_blocks(self.language_model)}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over supervised tokens (0 with a graph when there are none)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
