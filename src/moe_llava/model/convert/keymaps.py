"""State-dict key maps between the released MoE-LLaVA layout and ours, per backbone.

Released (reference code, transformers 4.37 naming; ``p`` = ``model.`` for Phi and StableLM,
``transformer.`` for Qwen-1) -> ours (:class:`~moe_llava.model.MoELlavaForCausalLM`):

* ``{p}mm_projector.image_spatial_proj.{0,2}.*`` -> ``projector.linear_{1,2}.*``
* ``{p}image_tower.image_tower.vision_model.X`` -> ``vision_tower.X``
* ``….mlp.deepspeed_moe.gate.wg.weight`` -> ``….mlp.router.weight`` (fp32)
* ``….mlp.deepspeed_moe.experts.deepspeed_experts.{e}.X`` -> ``….mlp.experts.{e}.X``
* Phi / StableLM: ``model.X`` -> ``language_model.model.X``, ``lm_head.weight`` ->
  ``language_model.lm_head.weight``; Phi's ``lm_head.bias``, which the reference does not have,
  is zeros.
* Qwen-1 -> transformers' Qwen2: ``wte``/``ln_f``/``ln_1``/``ln_2`` -> ``embed_tokens``/``norm``/
  ``input_layernorm``/``post_attention_layernorm``; the fused ``c_attn`` rows [q | k | v] split into
  ``q_proj``/``k_proj``/``v_proj``; ``attn.c_proj`` -> ``o_proj``; MLP ``w2``/``w1``/``c_proj`` ->
  ``gate_proj``/``up_proj``/``down_proj`` (Qwen-1 computes ``c_proj(w1(x) * silu(w2(x)))``).

Each output tensor is an :class:`Op` over source tensors; the reverse maps give the released names
of our keys (``moe-llava model convert --to reference``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_llava.errors import UserError

BACKBONES = ("phi", "stablelm", "qwen")
ROUTER_SUFFIX = ".mlp.router.weight"


@dataclass(frozen=True)
class Op:
    """One output tensor: ``copy`` a source, take part ``index`` of ``parts`` equal row blocks of it
    (``split``), ``concat`` the sources' rows, or ``zeros`` (of ``shape``)."""

    target: str
    sources: tuple[str, ...]
    kind: str = "copy"
    index: int = 0
    parts: int = 1
    shape: tuple[int, ...] | None = None

    @property
    def is_router(self) -> bool:
        return self.target.endswith(ROUTER_SUFFIX) or self.target.endswith(".deepspeed_moe.gate.wg.weight")


# (released pattern, our replacement): the first match wins
_VISION_AND_PROJECTOR = [
    (r"{p}mm_projector\.image_spatial_proj\.0\.(weight|bias)", r"projector.linear_1.\1"),
    (r"{p}mm_projector\.image_spatial_proj\.2\.(weight|bias)", r"projector.linear_2.\1"),
    (r"{p}image_tower\.image_tower\.vision_model\.(.+)", r"vision_tower.\1"),
]
_MOE = [
    (
        r"{p}{layers}\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight",
        r"language_model.model.layers.\1.mlp.router.weight",
    ),
]
_HF_NAMED = [  # Phi and StableLM: transformers' own names under model.
    *_VISION_AND_PROJECTOR,
    *_MOE,
    (
        r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)",
        r"language_model.model.layers.\1.mlp.experts.\2.\3",
    ),
    (r"model\.((?:embed_tokens|final_layernorm|norm)\..+|layers\.\d+\..+)", r"language_model.model.\1"),
    (r"lm_head\.weight", r"language_model.lm_head.weight"),
]
_QWEN_MLP = {"w1": "up_proj", "w2": "gate_proj", "c_proj": "down_proj"}
_QWEN = [
    *_VISION_AND_PROJECTOR,
    *_MOE,
    (
        r"transformer\.h\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w1|w2|c_proj)\.weight",
        lambda m: f"language_model.model.layers.{m[1]}.mlp.experts.{m[2]}.{_QWEN_MLP[m[3]]}.weight",
    ),
    (
        r"transformer\.h\.(\d+)\.mlp\.(w1|w2|c_proj)\.weight",
        lambda m: f"language_model.model.layers.{m[1]}.mlp.{_QWEN_MLP[m[2]]}.weight",
    ),
    (r"transformer\.wte\.weight", r"language_model.model.embed_tokens.weight"),
    (r"transformer\.ln_f\.weight", r"language_model.model.norm.weight"),
    (r"transformer\.h\.(\d+)\.ln_1\.weight", r"language_model.model.layers.\1.input_layernorm.weight"),
    (
        r"transformer\.h\.(\d+)\.ln_2\.weight",
        r"language_model.model.layers.\1.post_attention_layernorm.weight",
    ),
    (
        r"transformer\.h\.(\d+)\.attn\.c_proj\.weight",
        r"language_model.model.layers.\1.self_attn.o_proj.weight",
    ),
    (r"lm_head\.weight", r"language_model.lm_head.weight"),
]
_QWEN_QKV = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)")


def prefix(backbone: str) -> str:
    return "transformer." if backbone == "qwen" else "model."


def _rules(backbone: str) -> list[tuple[re.Pattern, object]]:
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    table = _QWEN if backbone == "qwen" else _HF_NAMED
    p = re.escape(prefix(backbone))
    layers = r"h" if backbone == "qwen" else r"layers"
    return [(re.compile(pattern.format(p=p, layers=layers)), repl) for pattern, repl in table]


def released_to_ours(backbone: str, keys: list[str]) -> tuple[list[Op], list[str]]:
    """The ops that make our tensors from released ``keys``, and the keys no rule maps."""
    rules = _rules(backbone)
    ops: list[Op] = []
    unmapped: list[str] = []
    for key in keys:
        qkv = _QWEN_QKV.fullmatch(key) if backbone == "qwen" else None
        if qkv:
            layer, kind = qkv.groups()
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                target = f"language_model.model.layers.{layer}.self_attn.{proj}.{kind}"
                ops.append(Op(target, (key,), "split", index=i, parts=3))
            continue
        for pattern, repl in rules:
            match = pattern.fullmatch(key)
            if match:
                target = repl(match) if callable(repl) else match.expand(repl)
                ops.append(Op(target, (key,)))
                break
        else:
            unmapped.append(key)
    return ops, unmapped


# ------------------------------------------------------------------------------------- reverse
_REVERSE_COMMON = [
    (r"projector\.linear_1\.(weight|bias)", r"{p}mm_projector.image_spatial_proj.0.\1"),
    (r"projector\.linear_2\.(weight|bias)", r"{p}mm_projector.image_spatial_proj.2.\1"),
    (r"vision_tower\.(.+)", r"{p}image_tower.image_tower.vision_model.\1"),
]
_REVERSE_HF_NAMED = [
    *_REVERSE_COMMON,
    (
        r"language_model\.model\.layers\.(\d+)\.mlp\.router\.weight",
        r"model.layers.\1.mlp.deepspeed_moe.gate.wg.weight",
    ),
    (
        r"language_model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)",
        r"model.layers.\1.mlp.deepspeed_moe.experts.deepspeed_experts.\2.\3",
    ),
    (r"language_model\.model\.(.+)", r"model.\1"),
    (r"language_model\.lm_head\.weight", r"lm_head.weight"),
]
_QWEN_MLP_REVERSE = {v: k for k, v in _QWEN_MLP.items()}
_REVERSE_QWEN = [
    *_REVERSE_COMMON,
    (
        r"language_model\.model\.layers\.(\d+)\.mlp\.router\.weight",
        r"transformer.h.\1.mlp.deepspeed_moe.gate.wg.weight",
    ),
    (
        r"language_model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
        lambda m: (
            f"transformer.h.{m[1]}.mlp.deepspeed_moe.experts.deepspeed_experts.{m[2]}.{_QWEN_MLP_REVERSE[m[3]]}.weight"
        ),
    ),
    (
        r"language_model\.model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
        lambda m: f"transformer.h.{m[1]}.mlp.{_QWEN_MLP_REVERSE[m[2]]}.weight",
    ),
    (r"language_model\.model\.embed_tokens\.weight", r"transformer.wte.weight"),
    (r"language_model\.model\.norm\.weight", r"transformer.ln_f.weight"),
    (r"language_model\.model\.layers\.(\d+)\.input_layernorm\.weight", r"transformer.h.\1.ln_1.weight"),
    (
        r"language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.weight",
        r"transformer.h.\1.ln_2.weight",
    ),
    (
        r"language_model\.model\.layers\.(\d+)\.self_attn\.o_proj\.weight",
        r"transformer.h.\1.attn.c_proj.weight",
    ),
    (r"language_model\.lm_head\.weight", r"lm_head.weight"),
]
_OUR_QKV = re.compile(
    r"language_model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)"
)
PHI_LM_HEAD_BIAS = "language_model.lm_head.bias"


def ours_to_released(backbone: str, keys: list[str]) -> tuple[list[Op], list[str]]:
    """The ops that make released tensors from our ``keys``, and the keys no rule maps. Phi's
    ``lm_head.bias`` maps to nothing (the caller checks it is zeros)."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    table = _REVERSE_QWEN if backbone == "qwen" else _REVERSE_HF_NAMED
    p = prefix(backbone)
    rules = [(re.compile(pattern), repl) for pattern, repl in table]
    ops: list[Op] = []
    unmapped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        if backbone == "phi" and key == PHI_LM_HEAD_BIAS:
            continue
        match = _OUR_QKV.fullmatch(key) if backbone == "qwen" else None
        if match:
            layer, proj, kind = match.groups()
            qkv.setdefault((layer, kind), {})[proj] = key
            continue
        for pattern, repl in rules:
            match = pattern.fullmatch(key)
            if match:
                target = repl(match) if callable(repl) else match.expand(repl.replace("{p}", p))
                ops.append(Op(target, (key,)))
                break
        else:
            unmapped.append(key)
    for (layer, kind), parts in sorted(qkv.items(), key=lambda item: (int(item[0][0]), item[0][1])):
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            unmapped.extend(sorted(parts.values()))
            continue
        sources = tuple(parts[p] for p in ("q_proj", "k_proj", "v_proj"))
        ops.append(Op(f"transformer.h.{layer}.attn.c_attn.{kind}", sources, "concat"))
    return ops, unmapped
