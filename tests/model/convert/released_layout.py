"""Tiny checkpoints in the exact layout of the released MoE-LLaVA checkpoints (LanguageBind/MoE-LLaVA-*).

Written from ``transformers`` classes with their keys renamed to the reference's (transformers 4.37
naming, DeepSpeed-MoE's ``deepspeed_moe.gate.wg`` / ``deepspeed_moe.experts.deepspeed_experts.{e}``,
Qwen-1's fused ``c_attn``), with every weight random and each expert distinct, so that a permuted
expert or a swapped projection shows in the logits. Facts: shared/reference/moe-llava-checkpoints.md.
"""

from __future__ import annotations

import base64
import copy
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    StableLmConfig,
    StableLmForCausalLM,
)

VOCAB, D, FF, LAYERS, HEADS = 96, 32, 64, 4, 4
MOE_LAYERS = [0, 2]
EXPERTS = 4
HUB_TOWERS = {"clip": "openai/clip-vit-large-patch14-336", "siglip": "google/siglip-so400m-patch14-384"}
VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
PREFIX = {"phi": "model.", "stablelm": "model.", "qwen": "transformer."}
MARKER = "tokenizer-code-ran"


def vision_config(kind: str, values: dict | None = None) -> dict:
    """The tiny tower's config as ``--vision-config`` takes it (in place of the hub tower's)."""
    return {"model_type": f"{kind}_vision_model", **(values or VISION)}


def _vision_model(kind: str, values: dict | None = None) -> nn.Module:
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**(values or VISION)))
    return SiglipVisionModel(SiglipVisionConfig(**(values or VISION), layer_norm_eps=1e-6))


def _lm(backbone: str, vocab: int = VOCAB) -> nn.Module:
    common = dict(vocab_size=vocab, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                  max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    if backbone == "phi":
        config = PhiConfig(**common, intermediate_size=FF, hidden_act="gelu_new", partial_rotary_factor=0.5,
                           resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)  # fmt: skip
        return PhiForCausalLM(config)
    if backbone == "stablelm":
        config = StableLmConfig(**common, intermediate_size=FF, partial_rotary_factor=0.25, use_qkv_bias=True,
                                layer_norm_eps=1e-5, hidden_act="silu")  # fmt: skip
        return StableLmForCausalLM(config)
    config = Qwen2Config(**common, intermediate_size=FF, rms_norm_eps=1e-6,
                         hidden_act="silu", use_sliding_window=False)  # fmt: skip
    return Qwen2ForCausalLM(config)


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or "layrnorm" in name or name.endswith("ln_1.weight"):
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def released_config(
    backbone: str,
    vision: str = "clip",
    moe: dict | None = None,
    vision_values: dict | None = None,
    **overrides,
) -> dict:
    """config.json with the released field names and values (scaled down)."""
    moe_dict = {
        "moe_enable": True,
        "moe_mode": "sparse",
        "moe_layers_idx": MOE_LAYERS,
        "num_experts": [EXPERTS] * len(MOE_LAYERS),
        "top_k_experts": 2,
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
        "ep_size": 1,
        "use_residual": False,
        "router_aux_loss_coef": 0.01,
        "train_modules": {
            "phi": ["fc1", "fc2", "wg"],
            "stablelm": ["gate_proj", "up_proj", "down_proj", "wg"],
            "qwen": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"],
        }[backbone],
        **(moe or {}),
    }
    llava = {
        "mm_image_tower": HUB_TOWERS[vision],
        "mm_hidden_size": (vision_values or VISION)["hidden_size"],
        "mm_video_tower": None,
        "image_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_padding_side": "right",
        "video_projector_type": "linear",
        "moe": moe_dict,
    }
    if backbone == "phi":
        lm = {
            "_name_or_path": "./checkpoints/MoE-LLaVA-Phi2-Stage2",
            "architectures": ["MoELLaVAPhiForCausalLM"],
            "model_type": "moe_llava_phi",
            "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "gelu_new",
            "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "resid_pdrop": 0.1,
            "embd_pdrop": 0.0, "attention_dropout": 0.0, "qk_layernorm": False, "max_position_embeddings": 256,
            "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None, "tie_word_embeddings": False,
            "rope_scaling": None,
        }  # fmt: skip
    elif backbone == "stablelm":
        lm = {
            "_name_or_path": "./checkpoints/llavastablelm-2b-other",
            "architectures": ["MoELLaVAStablelmForCausalLM"],
            "auto_map": {"AutoConfig": "stabilityai/stablelm-2-1_6b--configuration_stablelm_epoch.StableLMEpochConfig"},
            "model_type": "moe_llava_stablelm",
            "bos_token_id": 90, "eos_token_id": 90, "pad_token_id": 91,
            "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "silu",
            "rope_pct": 0.25, "rope_theta": 10000, "rotary_scaling_factor": 1.0, "norm_eps": 1e-5,
            "max_position_embeddings": 256, "use_qkv_bias": True, "tie_word_embeddings": False,
            "initializer_range": 0.02, "use_cache": True,
        }  # fmt: skip
    else:
        lm = {
            "_name_or_path": "./checkpoints/llavaqwen-1.8b",
            "architectures": ["MoELLaVAQWenForCausalLM"],
            "auto_map": {"AutoConfig": "Qwen/Qwen-1_8B--configuration_qwen.QWenConfig"},
            "model_type": "moe_llava_qwen",
            "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": 2 * FF, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "kv_channels": D // HEADS, "rotary_emb_base": 10000, "rotary_pct": 1.0,
            "layer_norm_epsilon": 1e-6, "seq_length": 256, "max_position_embeddings": 256, "no_bias": True,
            "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": False, "bf16": True, "fp16": False,
            "fp32": False, "scale_attn_weights": True, "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
            "softmax_in_fp32": False, "tie_word_embeddings": False, "initializer_range": 0.02,
            "tokenizer_class": "QWenTokenizer",
        }  # fmt: skip
    return {**lm, **llava, "torch_dtype": "float32", "transformers_version": "4.37.0", **overrides}


def released_state(
    backbone: str, vision: str = "clip", seed: int = 0, vocab: int = VOCAB, vision_values: dict | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny released checkpoint (fp32), under the reference's names."""
    g = torch.Generator().manual_seed(seed)
    p = PREFIX[backbone]
    lm = _lm(backbone, vocab)
    _randomize(lm, g)
    tower = _vision_model(vision, vision_values)
    _randomize(tower, g)
    state: dict[str, torch.Tensor] = {}
    lm_state = lm.state_dict()
    layers = lm.model.layers
    experts = {}
    for i in MOE_LAYERS:
        experts[i] = []
        for _ in range(EXPERTS):
            expert = copy.deepcopy(layers[i].mlp)
            _randomize(expert, g)
            experts[i].append(expert.state_dict())
    if backbone in ("phi", "stablelm"):
        for key, value in lm_state.items():
            if key == "lm_head.bias":  # the reference's Phi lm_head is bias-free
                continue
            parts = key.split(".")
            if parts[:2] == ["model", "layers"] and int(parts[2]) in MOE_LAYERS and parts[3] == "mlp":
                continue
            state[key] = value
        for i in MOE_LAYERS:
            for e, expert in enumerate(experts[i]):
                for name, value in expert.items():
                    state[f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = value
    else:
        mlp = {"gate_proj": "w2", "up_proj": "w1", "down_proj": "c_proj"}
        state["transformer.wte.weight"] = lm_state["model.embed_tokens.weight"]
        state["transformer.ln_f.weight"] = lm_state["model.norm.weight"]
        state["lm_head.weight"] = lm_state["lm_head.weight"]
        for i in range(LAYERS):
            src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
            state[dst + "ln_1.weight"] = lm_state[src + "input_layernorm.weight"]
            state[dst + "ln_2.weight"] = lm_state[src + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias"):
                state[dst + f"attn.c_attn.{kind}"] = torch.cat(
                    [lm_state[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
                )
            state[dst + "attn.c_proj.weight"] = lm_state[src + "self_attn.o_proj.weight"]
            if i in MOE_LAYERS:
                for e, expert in enumerate(experts[i]):
                    for ours, theirs in mlp.items():
                        state[dst + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{theirs}.weight"] = (
                            expert[f"{ours}.weight"]
                        )
            else:
                for ours, theirs in mlp.items():
                    state[dst + f"mlp.{theirs}.weight"] = lm_state[src + f"mlp.{ours}.weight"]
    for i in MOE_LAYERS:
        layer = "transformer.h" if backbone == "qwen" else "model.layers"
        state[f"{layer}.{i}.mlp.deepspeed_moe.gate.wg.weight"] = torch.randn(EXPERTS, D, generator=g)
    state[f"{p}mm_projector.image_spatial_proj.0.weight"] = 0.3 * torch.randn(
        D, (vision_values or VISION)["hidden_size"], generator=g
    )
    state[f"{p}mm_projector.image_spatial_proj.0.bias"] = 0.1 * torch.randn(D, generator=g)
    state[f"{p}mm_projector.image_spatial_proj.2.weight"] = 0.3 * torch.randn(D, D, generator=g)
    state[f"{p}mm_projector.image_spatial_proj.2.bias"] = 0.1 * torch.randn(D, generator=g)
    for key, value in tower.state_dict().items():
        state[f"{p}image_tower.image_tower.vision_model.{key}"] = value
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def tiktoken_ranks(texts: list[str], merges: int = 60) -> dict[bytes, int]:
    """A small byte-level BPE vocabulary in tiktoken's form (every byte, then merged pieces by rank)."""
    import regex

    from moe_llava.model.convert.tokenizer import TIKTOKEN_PATTERN

    ranks = {bytes([b]): b for b in range(256)}
    words = [
        [bytes([b]) for b in piece.encode()] for t in texts for piece in regex.findall(TIKTOKEN_PATTERN, t)
    ]
    for _ in range(merges):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


TOKENIZER_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: <image>\nWhat is the colour of the square? ASSISTANT: The square is red.",
    "There are 12 shapes: 3 circles, 4 triangles and 5 squares.",
]


def write_tokenizer(folder: Path, backbone: str) -> None:
    if backbone == "phi":
        from moe_llava.data.tokenizer import train_bpe_tokenizer

        tok = train_bpe_tokenizer(TOKENIZER_TEXTS * 4, folder, vocab_size=300, min_frequency=1)
        del tok
        return
    cls, vocab = (
        ("QWenTokenizer", "qwen.tiktoken")
        if backbone == "qwen"
        else ("Arcade100kTokenizer", "arcade100k.tiktoken")
    )
    ranks = tiktoken_ranks(TOKENIZER_TEXTS)
    (folder / vocab).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    module = "tokenization_qwen" if backbone == "qwen" else "tokenization_arcade100k"
    config = {
        "tokenizer_class": cls,
        "auto_map": {"AutoTokenizer": [f"{module}.{cls}", None]},
        "model_max_length": 8192,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = (
        {
            "eos_token": "<|endoftext|>",
            "unk_token": "<|extra_0|>",
            "pad_token": "<|extra_0|>",
            "bos_token": "<|extra_1|>",
        }
        if backbone == "qwen"
        else {"eos_token": "<|endoftext|>", "unk_token": "<|reg0|>", "pad_token": "<|reg0|>"}
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    # the hub ships the tokenizer as code; running it would leave this marker
    (folder / f"{module}.py").write_text(f"open({str(folder / MARKER)!r}, 'w').write('ran')\n")


def write_released(
    folder: Path,
    backbone: str,
    *,
    vision: str = "clip",
    state: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    shards: int | None = None,
    fmt: str | None = None,
    router_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write a tiny released checkpoint; defaults as the hub serves each: Phi 2 safetensors shards
    + index, StableLM one safetensors file, Qwen fp32 ``.bin`` shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(state if state is not None else released_state(backbone, vision, seed))
    if router_dtype is not None:
        state = {k: v.to(router_dtype) if k.endswith("gate.wg.weight") else v for k, v in state.items()}
    fmt = fmt or ("bin" if backbone == "qwen" else "safetensors")
    shards = shards or (1 if backbone == "stablelm" else 2)
    keys = list(state)
    groups = [keys[i * len(keys) // shards : (i + 1) * len(keys) // shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        if fmt == "safetensors":
            name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in group}, str(folder / name), metadata={"format": "pt"})
        else:
            name = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in group}, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        total = sum(v.numel() * v.element_size() for v in state.values())
        (folder / index).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (folder / "config.json").write_text(json.dumps(config or released_config(backbone, vision), indent=2))
    write_tokenizer(folder, backbone)
    return folder, state


def real_released_config(name: str) -> dict:
    """config.json of a released checkpoint at its real sizes (reference doc, section 1.3)."""
    backbone, vision = {
        "phi2_clip336": ("phi", "clip"),
        "phi2_siglip384": ("phi", "siglip"),
        "qwen1_8b": ("qwen", "clip"),
        "stablelm1_6b": ("stablelm", "clip"),
    }[name]
    layers = {"phi": 32, "qwen": 24, "stablelm": 24}[backbone]
    moe = {"moe_layers_idx": list(range(0, layers, 2)), "num_experts": [4] * (layers // 2)}
    config = released_config(backbone, vision, moe=moe)
    config["mm_hidden_size"] = 1152 if vision == "siglip" else 1024
    config["num_hidden_layers"] = layers
    if backbone == "phi":
        config.update(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
                      num_key_value_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)  # fmt: skip
    elif backbone == "stablelm":
        config.update(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      bos_token_id=100257, eos_token_id=100257, pad_token_id=100280)  # fmt: skip
    else:
        config.update(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                      kv_channels=128, seq_length=8192, max_position_embeddings=8192)  # fmt: skip
    return config
