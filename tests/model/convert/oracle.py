"""An independent forward of a released MoE-LLaVA checkpoint, written from the reference semantics
(shared/reference/moe-llava-checkpoints.md, sections 2 and 3), not from this project's model code:
it reads the *released* state dict and config.json and imports nothing from ``moe_llava``.

* Vision: the tower's ``hidden_states[mm_vision_select_layer]``, first token dropped (CLIP's CLS;
  for SigLIP a real patch, as the reference's ``siglip_encoder.py`` does); Linear-GELU-Linear.
* Image splicing: each ``-200`` in ``input_ids`` is replaced by the image's features (the
  sequence grows), as ``llava_arch.py`` does.
* MoE FFN (DeepSpeed-MoE 0.9.5 ``top2gating`` without its Gumbel noise): fp32 gate, softmax,
  top-1 = argmax, top-2 = argmax of the rest, capacity ceil(S/E * cf * 2) over all S = B*L tokens
  (padding included), slots filled top-1 first in token order, kept gates renormalised.
* Phi / StableLM: transformers' ``PhiForCausalLM`` / ``StableLmForCausalLM`` (the reference's
  vendored copies are those classes), Phi with a zero lm_head bias, each MoE layer's MLP replaced by
  the MoE above. Qwen-1: written out below (fused qkv, RMSNorm in fp32, rotate-half RoPE on every
  head dimension, ``c_proj(w1(x) * silu(w2(x)))``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    StableLmConfig,
    StableLmForCausalLM,
)

IMAGE_PLACEHOLDER = -200


def top2_combine(
    x: torch.Tensor, wg: torch.Tensor, capacity_factor: float, min_capacity: int
) -> torch.Tensor:
    """(S, E) combine weights of DeepSpeed's top2gating with zero noise."""
    logits = x.float() @ wg.float().t()
    gates = logits.softmax(dim=-1)
    num_tokens, num_experts = gates.shape
    capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * 2), min_capacity)
    idx1 = gates.argmax(dim=-1)
    mask1 = F.one_hot(idx1, num_experts)
    idx2 = logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1)
    mask2 = F.one_hot(idx2, num_experts)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    mask1 = mask1 * (loc1 < capacity)
    mask2 = mask2 * (loc2 < capacity)
    g1 = (gates * mask1).sum(dim=1)
    g2 = (gates * mask2).sum(dim=1)
    denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
    g1, g2 = g1 / denom, g2 / denom
    return g1[:, None] * mask1 + g2[:, None] * mask2


class OracleMoE(nn.Module):
    def __init__(self, experts: list[nn.Module], wg: torch.Tensor, capacity_factor: float, min_capacity: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.register_buffer("wg", wg.float())
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.dropped = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        combine = top2_combine(x, self.wg, self.capacity_factor, self.min_capacity)
        self.dropped += int((combine > 0).sum(dim=1).lt(2).sum())
        out = sum(combine[:, e : e + 1].to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
        return out.reshape(hidden.shape)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def image_features(
    state: dict, config: dict, pixel_values: torch.Tensor, vision: dict, prefix: str
) -> torch.Tensor:
    values = {k: v for k, v in vision.items() if k != "model_type"}
    if vision["model_type"].startswith("siglip"):
        tower = SiglipVisionModel(SiglipVisionConfig(**values))
    else:
        tower = CLIPVisionModel(CLIPVisionConfig(**values))
    tower.load_state_dict(_sub(state, f"{prefix}image_tower.image_tower.vision_model."), strict=True)
    tower.float().eval()
    hidden = tower(pixel_values.float(), output_hidden_states=True).hidden_states[
        config["mm_vision_select_layer"]
    ]
    hidden = hidden[:, 1:]  # mm_vision_select_feature "patch": both encoders drop index 0
    w0, b0 = (
        state[f"{prefix}mm_projector.image_spatial_proj.0.weight"],
        state[f"{prefix}mm_projector.image_spatial_proj.0.bias"],
    )
    w2, b2 = (
        state[f"{prefix}mm_projector.image_spatial_proj.2.weight"],
        state[f"{prefix}mm_projector.image_spatial_proj.2.bias"],
    )
    return F.linear(F.gelu(F.linear(hidden, w0.float(), b0.float())), w2.float(), b2.float())


def splice(
    embed: torch.Tensor,
    input_ids: list[list[int]],
    features: torch.Tensor | None,
    pad_embedding: torch.Tensor,
):
    """Sequences with each -200 replaced by the next image's features; right-padded with ``pad_embedding``.
    Returns (embeds (B, L, d), attention_mask (B, L))."""
    rows, image = [], 0
    for ids in input_ids:
        parts = []
        for token in ids:
            if token == IMAGE_PLACEHOLDER:
                parts.append(features[image])
                image += 1
            else:
                parts.append(embed[token][None])
        rows.append(torch.cat(parts))
    length = max(r.shape[0] for r in rows)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    out = pad_embedding.expand(len(rows), length, -1).clone()
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask


def _hf_lm(backbone: str, state: dict, c: dict) -> tuple[nn.Module, list[OracleMoE]]:
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                  num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                  num_key_value_heads=c.get("num_key_value_heads"), max_position_embeddings=c["max_position_embeddings"],
                  tie_word_embeddings=False)  # fmt: skip
    if backbone == "phi":
        lm = PhiForCausalLM(PhiConfig(**common, hidden_act=c["hidden_act"], partial_rotary_factor=c["partial_rotary_factor"],
                                      rope_theta=c["rope_theta"], layer_norm_eps=c["layer_norm_eps"], resid_pdrop=0.0,
                                      embd_pdrop=0.0, attention_dropout=0.0))  # fmt: skip
    else:
        lm = StableLmForCausalLM(StableLmConfig(**common, hidden_act=c["hidden_act"], partial_rotary_factor=c["rope_pct"],
                                                rope_theta=c["rope_theta"], layer_norm_eps=c["norm_eps"],
                                                use_qkv_bias=c["use_qkv_bias"]))  # fmt: skip
    moe = c["moe"]
    blocks = []
    for i in moe["moe_layers_idx"]:
        layer = lm.model.layers[i]
        experts = []
        for e in range(moe["num_experts"][0]):
            expert = type(layer.mlp)(lm.config)
            expert.load_state_dict(
                _sub(state, f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.")
            )
            experts.append(expert)
        block = OracleMoE(experts, state[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"],
                          moe["eval_capacity_factor"], moe["min_capacity"])  # fmt: skip
        layer.mlp = block
        blocks.append(block)
    lm_state = {k: v for k, v in state.items() if (k.startswith("model.") or k.startswith("lm_head"))}
    lm_state = {
        k: v
        for k, v in lm_state.items()
        if "deepspeed_moe" not in k and "mm_projector" not in k and "image_tower" not in k
    }
    if backbone == "phi":
        lm_state["lm_head.bias"] = torch.zeros(c["vocab_size"])
    missing, unexpected = lm.load_state_dict(lm_state, strict=False)
    assert not unexpected, unexpected
    assert all(".mlp." in k for k in missing), missing  # only the replaced MLPs' own (unused) names
    return lm.float().eval(), blocks


class Qwen1:
    """Qwen-1 (QWenLMHeadModel's forward, eval mode, inside its seq_length) from the released state dict."""

    def __init__(self, state: dict, c: dict):
        self.s, self.c = {k: v.float() for k, v in state.items()}, c
        self.moe = {i: None for i in c["moe"]["moe_layers_idx"]}
        self.dropped = 0

    def rms(self, x, w):
        eps = self.c["layer_norm_epsilon"]
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

    def mlp(self, x, prefix):
        s = self.s
        return F.linear(
            F.linear(x, s[prefix + "w1.weight"]) * F.silu(F.linear(x, s[prefix + "w2.weight"])),
            s[prefix + "c_proj.weight"],
        )

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s, c = self.s, self.c
        b, n, d = embeds.shape
        heads, head_dim = c["num_attention_heads"], c["kv_channels"]
        inv_freq = 1.0 / (c["rotary_emb_base"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

        def rope(t):
            t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2 :]
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & mask.bool()[:, None, :]
        h = embeds
        for i in range(c["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            x = self.rms(h, s[p + "ln_1.weight"])
            qkv = F.linear(x, s[p + "attn.c_attn.weight"], s[p + "attn.c_attn.bias"])
            q, k, v = (t.reshape(b, n, heads, head_dim) for t in qkv.split(d, dim=-1))
            q, k = rope(q), rope(k)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
            scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
            attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, d)
            h = h + F.linear(attn, s[p + "attn.c_proj.weight"])
            x = self.rms(h, s[p + "ln_2.weight"])
            if i in self.moe:
                flat = x.reshape(-1, d)
                moe = c["moe"]
                combine = top2_combine(
                    flat,
                    s[p + "mlp.deepspeed_moe.gate.wg.weight"],
                    moe["eval_capacity_factor"],
                    moe["min_capacity"],
                )
                self.dropped += int((combine > 0).sum(dim=1).lt(2).sum())
                out = sum(
                    combine[:, e : e + 1]
                    * self.mlp(flat, p + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}.")
                    for e in range(moe["num_experts"][0])
                )
                h = h + out.reshape(b, n, d)
            else:
                h = h + self.mlp(x, p + "mlp.")
        h = self.rms(h, s["transformer.ln_f.weight"])
        return F.linear(h, s["lm_head.weight"])


class Oracle:
    """The released checkpoint (``state``, ``config``), built once; called on prompts with -200 placeholders."""

    def __init__(self, state: dict, config: dict, vision: dict):
        self.backbone = re.sub("^moe_llava_", "", config["model_type"])
        self.prefix = "transformer." if self.backbone == "qwen" else "model."
        self.state = {k: v.float() for k, v in state.items()}
        self.config, self.vision = config, vision
        self.lm = (
            Qwen1(self.state, config)
            if self.backbone == "qwen"
            else _hf_lm(self.backbone, self.state, config)
        )

    @torch.no_grad()
    def __call__(self, input_ids: list[list[int]], pixel_values: torch.Tensor | None, pad_id: int):
        """(logits (B, L, V), attention_mask (B, L), tokens that lost an expert to the capacity)."""
        features = None
        if pixel_values is not None:
            features = image_features(self.state, self.config, pixel_values, self.vision, self.prefix)
        embed = self.state[
            "transformer.wte.weight" if self.backbone == "qwen" else "model.embed_tokens.weight"
        ]
        embeds, mask = splice(embed, input_ids, features, embed[pad_id])
        if self.backbone == "qwen":
            self.lm.dropped = 0
            return self.lm.forward(embeds, mask), mask, self.lm.dropped
        lm, blocks = self.lm
        for block in blocks:
            block.dropped = 0
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
        return logits, mask, sum(b.dropped for b in blocks)


def oracle_logits(state, config, vision, input_ids, pixel_values, pad_id):
    return Oracle(state, config, vision)(input_ids, pixel_values, pad_id)
