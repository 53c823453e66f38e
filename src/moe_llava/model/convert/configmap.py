"""config.json of a released MoE-LLaVA checkpoint <-> our :class:`~moe_llava.model.MoELlavaConfig`.

A released config is the backbone's flat LM config, the LLaVA fields (``mm_*``, ``image_*``) and
a ``moe`` dict (reference ``llava_*_moe.py``; DeepSpeed-MoE settings). Every field is either mapped,
known not to matter for the weights or for inference (training switches, bookkeeping), or refused
naming the field: values we do not implement (``ep_size`` != 1, ``use_residual``, a video tower,
im_start/im_end tokens, ...) and fields we do not know, so that nothing is silently reinterpreted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from moe_llava.errors import CheckpointError, UserError

MODEL_TYPES = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm", "moe_llava_qwen": "qwen"}
RELEASED_MODEL_TYPES = {backbone: model_type for model_type, backbone in MODEL_TYPES.items()}
ARCHITECTURES = {
    "phi": "MoELLaVAPhiForCausalLM",
    "stablelm": "MoELLaVAStablelmForCausalLM",
    "qwen": "MoELLaVAQWenForCausalLM",
}
TEMPLATES = {
    "phi": "phi",
    "qwen": "phi",
    "stablelm": "stablelm",
}  # reference conv modes (all SeparatorStyle.TWO)

# The towers of the released checkpoints (hub id -> transformers vision config).
VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}

# Fields any transformers config may carry; none changes the weights or the forward.
_GENERIC = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "initializer_range",
    "tokenizer_class",
}
# LLaVA fields that are training switches or bookkeeping.
_LLAVA_IGNORED = {
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "tune_mm_mlp_adapter",
    "use_mm_proj",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "mm_hidden_size",  # checked against the vision tower
    "mm_image_tower",  # the vision config
    "mm_vision_tower",
    "unfreeze_mm_vision_tower",
    "mm_vision_tower_lr",
}
# LLaVA fields of features the released models do not use: accepted only switched off.
_LLAVA_OFF = {"image_grid_pinpoints", "s2", "s2_scales"}
# (field, value required): features we do not implement unless the value is exactly this.
_LLAVA_REQUIRED = {
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_vision_select_feature": "patch",
    "image_projector_type": "mlp2x_gelu",
}
_MOE_FIELDS = {
    "moe_enable",
    "moe_mode",
    "moe_layers_idx",
    "num_experts",
    "top_k_experts",
    "capacity_factor",
    "eval_capacity_factor",
    "min_capacity",
    "ep_size",
    "use_residual",
    "router_aux_loss_coef",
    "train_modules",
}
_MOE_MODES = ("sparse", "dense", "first_half", "second_half")

_PHI_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
    "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "partial_rotary_factor", "qk_layernorm", "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip
_STABLELM_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_heads", "num_key_value_heads", "hidden_act", "rope_pct", "rope_theta", "rotary_scaling_factor",
    "max_position_embeddings", "norm_eps", "use_qkv_bias", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "attention_dropout", "hidden_dropout", "use_norm_bias",
}  # fmt: skip
_QWEN_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "emb_dropout_prob", "attn_dropout_prob", "layer_norm_epsilon", "max_position_embeddings",
    "scale_attn_weights", "bf16", "fp16", "fp32", "kv_channels", "rotary_pct", "rotary_emb_base",
    "use_dynamic_ntk", "use_logn_attn", "use_flash_attn", "no_bias", "tie_word_embeddings",
    "use_cache_quantization", "use_cache_kernel", "softmax_in_fp32", "seq_length", "onnx_safe",
    "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip
_LM_FIELDS = {"phi": _PHI_FIELDS, "stablelm": _STABLELM_FIELDS, "qwen": _QWEN_FIELDS}


class ConfigRefused(CheckpointError):
    """A released config field we cannot map; the message names the file and the field."""

    def __init__(self, file: Path, field: str, message: str):
        super().__init__(f"field {field!r}: {message}", file=file)
        self.field = field


def backbone_of(config: dict, file: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigRefused(
            file,
            "model_type",
            f"{model_type!r} is not a released MoE-LLaVA model; expected one of {sorted(MODEL_TYPES)}",
        )
    return MODEL_TYPES[model_type]


def _is_off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {})


def released_to_ours(
    config: dict, file: Path, *, vision_config: dict | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(backbone, our config fields except image_token_id / pad_color, the vision config used).

    ``vision_config``: the tower's config when it is not (or not only) in :data:`VISION_TOWERS`
    (``--vision-tower`` / ``--vision-config``).
    """
    backbone = backbone_of(config, file)

    def refuse(field: str, message: str):
        raise ConfigRefused(file, field, message)

    known = _GENERIC | _LLAVA_IGNORED | set(_LLAVA_REQUIRED) | _LM_FIELDS[backbone]
    known |= {"moe", "mm_vision_select_layer", "image_aspect_ratio"}
    for field in config:
        if field in known:
            continue
        if field in _LLAVA_OFF or field == "mm_patch_merge_type":
            if _is_off(config[field]) or config[field] == "flat":
                continue
            refuse(field, f"{config[field]!r}: not used by the released models, not supported")
        if field.startswith(("video", "mm_video")):
            if _is_off(config.get("mm_video_tower")):
                continue  # the video branch is off: its projectors are nn.Identity, with no weights
            refuse("mm_video_tower", f"{config['mm_video_tower']!r}: video towers are not supported")
        refuse(field, "unknown field: not converted (this converter maps every field it accepts)")
    for field, required in _LLAVA_REQUIRED.items():
        if field in config and config[field] != required:
            refuse(field, f"{config[field]!r} is not supported (only {required!r})")

    # vision tower
    tower = config.get("mm_image_tower") or config.get("mm_vision_tower")
    if vision_config is None:
        if tower not in VISION_TOWERS:
            refuse(
                "mm_image_tower",
                f"{tower!r} is not a known tower ({sorted(VISION_TOWERS)}); pass --vision-tower DIR "
                "(the tower's own folder) or --vision-config FILE",
            )
        vision_config = dict(VISION_TOWERS[tower])
    vision_config = dict(vision_config)
    if vision_config.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        refuse(
            "mm_image_tower", f"vision model_type {vision_config.get('model_type')!r}: CLIP or SigLIP only"
        )
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config["hidden_size"]:
        refuse(
            "mm_hidden_size", f"{mm_hidden} != the vision tower's hidden_size {vision_config['hidden_size']}"
        )
    siglip = vision_config["model_type"] == "siglip_vision_model"

    aspect = config.get("image_aspect_ratio", "pad")
    if aspect not in ("pad", None, "square"):
        refuse("image_aspect_ratio", f"{aspect!r} is not supported (pad, or none)")

    text_config = _text_config(backbone, config, refuse)
    ours: dict[str, Any] = {
        "vision_config": vision_config,
        "text_config": text_config,
        "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        "projector_type": config.get("image_projector_type", "mlp2x_gelu"),
        "conversation_template": TEMPLATES[backbone],
        "image_aspect": "pad" if aspect == "pad" else "none",
        # the reference's SigLIP encoder drops the first of its patch features (siglip_encoder.py)
        "drop_first_patch": siglip,
        "router_z_loss_coef": 0.0,
    }
    moe = config.get("moe")
    if not isinstance(moe, dict):
        refuse("moe", "missing: not a MoE-LLaVA stage-3 config")
    ours.update(_moe(moe, text_config["num_hidden_layers"], refuse))
    return backbone, ours, vision_config


def _moe(moe: dict, num_layers: int, refuse) -> dict[str, Any]:
    for field in moe:
        if field not in _MOE_FIELDS:
            refuse(f"moe.{field}", "unknown field: not converted")
    if not moe.get("moe_enable", False):
        return {"moe": None, "router_aux_loss_coef": float(moe.get("router_aux_loss_coef", 0.01))}
    if moe.get("ep_size", 1) != 1:
        refuse("moe.ep_size", f"{moe['ep_size']}: expert parallelism is not supported (only 1)")
    if moe.get("use_residual", False):
        refuse("moe.use_residual", "true: residual MoE (PR-MoE) is not supported")
    if moe.get("moe_mode", "sparse") not in _MOE_MODES:
        refuse("moe.moe_mode", f"{moe['moe_mode']!r}: expected one of {_MOE_MODES}")
    layers = moe.get("moe_layers_idx")
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        refuse("moe.moe_layers_idx", f"{layers!r}: expected a list of layer indices")
    if any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        refuse("moe.moe_layers_idx", f"{layers}: out of range or repeated for {num_layers} layers")
    experts = moe.get("num_experts")
    experts = experts if isinstance(experts, list) else [experts]
    if len(set(experts)) != 1 or not isinstance(experts[0], int) or experts[0] < 2:
        refuse("moe.num_experts", f"{moe.get('num_experts')!r}: one expert count >= 2 for every MoE layer")
    if len(experts) not in (1, len(layers)):
        refuse("moe.num_experts", f"{len(experts)} counts for {len(layers)} MoE layers")
    top_k = moe.get("top_k_experts", 2)
    if top_k != 2:  # DeepSpeed-MoE 0.9.5's top1gating picks the kept tokens at random (use_rts)
        refuse("moe.top_k_experts", f"{top_k}: only top-2 (DeepSpeed's top2gating) is converted")
    return {
        "moe": {
            "num_experts": experts[0],
            "top_k": top_k,
            "layers": sorted(layers),
            "capacity_factor": float(moe.get("capacity_factor", 1.0)),
            "eval_capacity_factor": float(moe.get("eval_capacity_factor", 1.0)),
            "min_capacity": int(moe.get("min_capacity", 4)),
            # the reference's eval routing has Gumbel noise on expert 2; ours is deterministic
            "second_expert_noise": False,
            # the reference routes padding like any token (and counts it in the capacity)
            "count_padding": True,
            "expert_path": "auto",
        },
        "router_aux_loss_coef": float(moe.get("router_aux_loss_coef", 0.01)),
    }


def _text_config(backbone: str, c: dict, refuse) -> dict[str, Any]:
    def need(field: str):
        if field not in c:
            refuse(field, "missing")
        return c[field]

    ids = {k: c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if backbone == "phi":
        if c.get("rope_scaling"):
            refuse("rope_scaling", f"{c['rope_scaling']!r}: rope scaling is not converted")
        heads = need("num_attention_heads")
        return {
            "model_type": "phi",
            "vocab_size": need("vocab_size"),
            "hidden_size": need("hidden_size"),
            "intermediate_size": need("intermediate_size"),
            "num_hidden_layers": need("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": c.get("num_key_value_heads") or heads,
            "resid_pdrop": c.get("resid_pdrop", 0.0),
            "embd_pdrop": c.get("embd_pdrop", 0.0),
            "attention_dropout": c.get("attention_dropout", 0.0),
            "hidden_act": c.get("hidden_act", "gelu_new"),
            "max_position_embeddings": c.get("max_position_embeddings", 2048),
            "layer_norm_eps": c.get("layer_norm_eps", 1e-5),
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
            "qk_layernorm": bool(c.get("qk_layernorm", False)),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(c.get("rope_theta", 10000.0)),
                "partial_rotary_factor": float(c.get("partial_rotary_factor", 0.5)),
            },
            **ids,
        }
    if backbone == "stablelm":
        heads = need("num_attention_heads")
        if c.get("num_heads", heads) != heads:
            refuse("num_heads", f"{c['num_heads']} != num_attention_heads {heads}")
        if float(c.get("rotary_scaling_factor", 1.0)) != 1.0:
            refuse("rotary_scaling_factor", f"{c['rotary_scaling_factor']}: rope scaling is not converted")
        if c.get("use_norm_bias", True) is False:
            refuse("use_norm_bias", "false: StableLM LayerNorms without bias are not converted")
        return {
            "model_type": "stablelm",
            "vocab_size": need("vocab_size"),
            "hidden_size": need("hidden_size"),
            "intermediate_size": need("intermediate_size"),
            "num_hidden_layers": need("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": c.get("num_key_value_heads") or heads,
            "hidden_act": c.get("hidden_act", "silu"),
            "max_position_embeddings": c.get("max_position_embeddings", 4096),
            "layer_norm_eps": c.get("norm_eps", 1e-5),
            "use_qkv_bias": bool(c.get("use_qkv_bias", False)),
            "qk_layernorm": False,
            "use_parallel_residual": False,
            "hidden_dropout": c.get("hidden_dropout", 0.0),
            "attention_dropout": c.get("attention_dropout", 0.0),
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(c.get("rope_theta", 10000.0)),
                "partial_rotary_factor": float(c.get("rope_pct", 0.25)),
            },
            **ids,
        }
    # Qwen-1 -> Qwen2
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_channels = c.get("kv_channels", hidden // heads)
    if kv_channels * heads != hidden:
        refuse("kv_channels", f"{kv_channels} x {heads} heads != hidden_size {hidden}")
    if float(c.get("rotary_pct", 1.0)) != 1.0:
        refuse("rotary_pct", f"{c['rotary_pct']}: Qwen2 rotates every head dimension (only 1.0)")
    if c.get("scale_attn_weights", True) is not True:
        refuse("scale_attn_weights", "false: unscaled attention is not converted")
    if c.get("no_bias", True) is not True:
        refuse("no_bias", "false: Qwen-1 linears with biases beyond c_attn are not converted")
    if need("intermediate_size") % 2:
        refuse("intermediate_size", f"{c['intermediate_size']} is odd; Qwen-1's MLP width is half of it")
    # Dynamic NTK and logn attention (use_dynamic_ntk, use_logn_attn) act only past seq_length,
    # which becomes the context limit here, so within it the two models compute the same thing.
    context = c.get("seq_length") or c.get("max_position_embeddings") or 8192
    return {
        "model_type": "qwen2",
        "vocab_size": need("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": c["intermediate_size"] // 2,
        "num_hidden_layers": need("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": c.get("layer_norm_epsilon", 1e-6),
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.get("rotary_emb_base", 10000.0))},
        **ids,
    }


def reference_pad_color(image_mean) -> list[int]:
    """The reference's pad colour: ``int(m * 255)`` per channel (truncated, not rounded)."""
    return [int(m * 255) for m in image_mean]


# --------------------------------------------------------------------------------------- reverse
def ours_to_released(ours: dict, source: dict | None = None) -> tuple[str, dict[str, Any]]:
    """(backbone, released config.json) of our MoE export config; ``source``: the released config
    this export was converted from, if any, for the fields we do not model (``_name_or_path``,
    ``auto_map``, ``train_modules`` ...)."""
    text = ours["text_config"]
    vision = ours["vision_config"]
    backbone = {"phi": "phi", "stablelm": "stablelm", "qwen2": "qwen"}.get(text.get("model_type"))
    if backbone is None:
        raise UserError(
            f"text_config.model_type {text.get('model_type')!r}: the released layout exists for phi, "
            "stablelm and qwen2 (Qwen-1) backbones only"
        )
    moe = ours.get("moe")
    if moe is None:
        raise UserError("moe: a dense export; the released layout is for MoE (stage-3) models")
    if ours.get("projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise UserError(f"projector_type {ours['projector_type']!r}: the reference has mlp2x_gelu")
    siglip = vision.get("model_type") in ("siglip_vision_model", "siglip")
    if siglip != bool(ours.get("drop_first_patch", False)):
        raise UserError(
            "drop_first_patch: the reference drops the first patch feature exactly for SigLIP towers; "
            f"this export has drop_first_patch={ours.get('drop_first_patch')} with a "
            f"{vision.get('model_type')} tower"
        )
    rope = text.get("rope_parameters") or {}
    out: dict[str, Any] = {}
    if source:
        out.update(copy.deepcopy(source))
    out["model_type"] = RELEASED_MODEL_TYPES[backbone]
    out["architectures"] = [ARCHITECTURES[backbone]]
    if backbone == "phi":
        out.update(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads"),
            resid_pdrop=text.get("resid_pdrop", 0.0),
            embd_pdrop=text.get("embd_pdrop", 0.0),
            attention_dropout=text.get("attention_dropout", 0.0),
            hidden_act=text.get("hidden_act", "gelu_new"),
            max_position_embeddings=text.get("max_position_embeddings"),
            layer_norm_eps=text.get("layer_norm_eps"),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            qk_layernorm=bool(text.get("qk_layernorm", False)),
            rope_theta=rope.get("rope_theta", 10000.0),
            partial_rotary_factor=rope.get("partial_rotary_factor", 0.5),
        )
    elif backbone == "stablelm":
        out.update(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads"),
            hidden_act=text.get("hidden_act", "silu"),
            max_position_embeddings=text.get("max_position_embeddings"),
            norm_eps=text.get("layer_norm_eps"),
            use_qkv_bias=bool(text.get("use_qkv_bias", False)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            rope_pct=rope.get("partial_rotary_factor", 0.25),
            rope_theta=rope.get("rope_theta", 10000.0),
            rotary_scaling_factor=1.0,
        )
        if text.get("use_parallel_residual") or text.get("qk_layernorm"):
            raise UserError("text_config: use_parallel_residual / qk_layernorm have no reference counterpart")
    else:
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if text.get("num_key_value_heads", heads) != heads:
            raise UserError("text_config.num_key_value_heads: Qwen-1 has no grouped-query attention")
        out.update(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"] * 2,
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            kv_channels=head_dim,
            layer_norm_epsilon=text.get("rms_norm_eps"),
            max_position_embeddings=text.get("max_position_embeddings"),
            seq_length=text.get("max_position_embeddings"),
            rotary_emb_base=rope.get("rope_theta", 10000.0),
            rotary_pct=1.0,
            no_bias=True,
            scale_attn_weights=True,
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(key) is not None or (source and key in source):
            out[key] = text.get(key)
    tower = _tower_id(vision)
    out.update(
        mm_image_tower=(source or {}).get("mm_image_tower") or tower,
        mm_hidden_size=vision["hidden_size"],
        image_projector_type="mlp2x_gelu",
        mm_vision_select_layer=ours.get("vision_feature_layer", -2),
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad" if ours.get("image_aspect", "pad") == "pad" else "square",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    out.setdefault("mm_video_tower", None)
    src_moe = (source or {}).get("moe") or {}
    out["moe"] = {
        **src_moe,
        "moe_enable": True,
        "moe_mode": src_moe.get("moe_mode", "sparse"),
        "moe_layers_idx": list(moe["layers"]),
        "num_experts": [moe["num_experts"]] * len(moe["layers"]),
        "top_k_experts": moe["top_k"],
        "capacity_factor": _factor(moe, "capacity_factor"),
        "eval_capacity_factor": _factor(moe, "eval_capacity_factor"),
        "min_capacity": moe.get("min_capacity", 0),
        "ep_size": 1,
        "use_residual": False,
        "router_aux_loss_coef": ours.get("router_aux_loss_coef", 0.01),
    }
    return backbone, out


def _factor(moe: dict, name: str) -> float:
    """A capacity factor; ours may be None (dropless), which in the reference's capacity formula
    ceil(S / E * f * k) >= S is f = E / k."""
    value = moe.get(name)
    return float(value) if value is not None else moe["num_experts"] / moe["top_k"]


def _tower_id(vision: dict) -> str | None:
    for hub_id, values in VISION_TOWERS.items():
        if all(vision.get(k) == v for k, v in values.items() if k != "model_type"):
            return hub_id
    return vision.get("_name_or_path") or None


def is_released_checkpoint(folder: str | Path) -> str | None:
    """The released ``model_type`` of ``folder``'s config.json (e.g. ``moe_llava_phi``), else None.
    Reads JSON only: for the hints that name ``moe-llava model convert``."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if model_type in MODEL_TYPES else None


def convert_hint(folder: str | Path, model_type: str) -> str:
    return (
        f"a released MoE-LLaVA checkpoint (model_type {model_type!r}), not one of our exports: "
        f"convert it first with `moe-llava model convert {folder} DST` and use DST"
    )
