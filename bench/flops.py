"""Analytic FLOP counts of an ``MoELlavaForCausalLM``: what the training and generation suites
divide their times by.

Convention: one multiply-accumulate is 2 FLOPs, and only matrix products are counted: linear
layers, the vision tower's patch-embedding convolution and the attention scores. Norms,
activations, softmax, rotary embeddings, the loss, routing bookkeeping (top-k, sort, gather) and
the optimizer are O(d) per token against O(d^2) and are left out, as in the usual MFU convention.

Forward FLOPs (d: LM width, F: FFN width, m: FFN matrices, 3 for SwiGLU gate/up/down and 2 for a
GELU MLP; d_q / d_kv: query and key/value widths, heads x head_dim; V: vocabulary; E experts,
top-k; t: keys a query attends to, causal, so position + 1 in a prompt and the cache length in
decoding):

==========================  ======================================================  ==============
term                        FLOPs                                                   per
==========================  ======================================================  ==============
``attn_proj``               2 (d d_q + 2 d d_kv + d_q d)                            token, layer
``attn_scores``             2 * 2 t d_q  (q k^T and p v)                            token, layer
``ffn`` (dense layer)       2 m d F                                                 token, layer
``experts`` (MoE layer)     k * 2 m d F                                             token, layer
``router`` (MoE layer)      2 d E                                                   token, layer
``lm_head``                 2 d V                                                   logit row
``vision``                  patch conv 2 P (3 p^2) dv, then per layer and token:     image
                            2 (4 dv^2 + 2 n dv + 2 dv Fv)  (n = P + 1 tokens)
``projector``               2 (dv d + d d)                                          image token
==========================  ======================================================  ==============

So the dense-vs-MoE difference is exactly ``ffn`` against ``experts + router`` on the MoE layers;
attention, the vision tower, the projector and the LM head are common to both.

Training (:func:`training_flops`): backward = input-gradient GEMMs (the forward's FLOPs again, for
every product that has something trainable below it) + weight-gradient GEMMs (the forward's FLOPs
again, for trainable weights only; for the attention scores, the gradient of the second operand,
k or v, counts here). With everything trainable that is the familiar 3 x forward (6N per token);
stage 3 freezes attention, embeddings and the LM head, so those terms cost 2 x forward there.
Which parameters train is read from the model's ``requires_grad`` flags.

Generation (:func:`generation_flops`): one prefill forward over the prompt (images included)
computing logits for the last position only (``transformers`` passes ``logits_to_keep=1``), then
``new_tokens - 1`` single-token decode steps attending to the growing KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moe_llava.model.moe import SparseMoeBlock
from moe_llava.model.upcycle import find_decoder_layers, find_ffn_name


@dataclass(frozen=True)
class Shape:
    """What the FLOP formulas need from a model (its configs) and which parts train."""

    d: int
    ffn: int
    ffn_matrices: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    vision_d: int
    vision_ffn: int
    vision_layers: int
    vision_patches: int
    vision_tokens: int  # patches (+ CLS)
    vision_patch_flops: int  # MACs of the patch embedding per patch
    vision_mlp_matrices: int
    # requires_grad, per part (training)
    train_vision: bool = False
    train_projector: bool = False
    train_attention: tuple[bool, ...] = ()
    train_ffn: tuple[bool, ...] = ()
    train_router: tuple[bool, ...] = ()
    train_lm_head: bool = False
    lm_input_grads: bool = False
    per_layer_ffn: tuple[str, ...] = field(default=())  # "dense" or "moe"


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _ffn_matrices(ffn: nn.Module) -> int:
    expert = ffn.experts[0] if isinstance(ffn, SparseMoeBlock) else ffn
    return 3 if hasattr(expert, "gate_proj") else 2


def shape_of(model) -> Shape:
    """The FLOP-relevant shape of an ``MoELlavaForCausalLM`` from its configs and trainable flags."""
    text = model.config.text_config
    vision = model.config.vision_config
    d = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    moe = model.config.moe or {}
    decoder_layers = find_decoder_layers(model.language_model)
    ffns = [getattr(layer, find_ffn_name(layer)) for layer in decoder_layers]
    attns = [getattr(layer, "self_attn", None) for layer in decoder_layers]
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_tokens = patches + (1 if vision.model_type.startswith("clip") else 0)
    lm_head = model.language_model.get_output_embeddings()
    train_vision = _trains(model.vision_tower)
    train_projector = _trains(model.projector)
    train_embed = _trains(model.language_model.get_input_embeddings())
    train_lm = _trains(model.language_model)
    return Shape(
        d=d,
        ffn=text.intermediate_size,
        ffn_matrices=_ffn_matrices(ffns[0]),
        layers=len(decoder_layers),
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        vocab=lm_head.weight.shape[0],
        moe_layers=tuple(i for i, f in enumerate(ffns) if isinstance(f, SparseMoeBlock)),
        num_experts=int(moe.get("num_experts", 0)),
        top_k=int(moe.get("top_k", 0)),
        vision_d=vision.hidden_size,
        vision_ffn=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_patches=patches,
        vision_tokens=vision_tokens,
        vision_patch_flops=getattr(vision, "num_channels", 3) * vision.patch_size**2 * vision.hidden_size,
        vision_mlp_matrices=2,
        train_vision=train_vision,
        train_projector=train_projector,
        train_attention=tuple(_trains(a) for a in attns),
        train_ffn=tuple(_trains(f.experts) if isinstance(f, SparseMoeBlock) else _trains(f) for f in ffns),
        train_router=tuple(_trains(f.router) if isinstance(f, SparseMoeBlock) else False for f in ffns),
        train_lm_head=bool(lm_head.weight.requires_grad),
        # Something below the LM's products trains (image path, embeddings or LM layers): every LM
        # product then needs its input gradient (approximation: also layer 0 when only LM layers train).
        lm_input_grads=train_vision or train_projector or train_embed or train_lm,
        per_layer_ffn=tuple("moe" if isinstance(f, SparseMoeBlock) else "dense" for f in ffns),
    )


@dataclass
class Term:
    """One product's forward FLOPs over a whole call, and which gradients it gets in training."""

    name: str
    forward: float
    input_grad: bool = False
    weight_grad: bool = False

    @property
    def backward(self) -> float:
        return self.forward * (int(self.input_grad) + int(self.weight_grad))


def lm_terms(s: Shape, tokens: float, score_pairs: float, logit_rows: float) -> list[Term]:
    """Language-model products for ``tokens`` token positions, ``score_pairs`` (query, key) pairs and
    ``logit_rows`` LM-head rows."""
    terms = []
    grads = s.lm_input_grads
    for i in range(s.layers):
        attn_w = s.train_attention[i] if s.train_attention else False
        terms.append(
            Term(
                "attn_proj",
                2 * tokens * (s.d * s.q_dim + 2 * s.d * s.kv_dim + s.q_dim * s.d),
                grads,
                attn_w,
            )
        )
        terms.append(Term("attn_scores", 2 * 2 * score_pairs * s.q_dim, grads, grads))
        ffn_w = s.train_ffn[i] if s.train_ffn else False
        per_ffn = 2 * s.ffn_matrices * s.d * s.ffn
        if i in s.moe_layers:
            terms.append(Term("experts", tokens * s.top_k * per_ffn, grads, ffn_w))
            router_w = s.train_router[i] if s.train_router else False
            terms.append(Term("router", 2 * tokens * s.d * s.num_experts, grads, router_w))
        else:
            terms.append(Term("ffn", tokens * per_ffn, grads, ffn_w))
    terms.append(Term("lm_head", 2 * logit_rows * s.d * s.vocab, grads, s.train_lm_head))
    return terms


def image_terms(s: Shape, images: float) -> list[Term]:
    """Vision tower (all its layers run) and projector products for ``images`` images."""
    n, dv = s.vision_tokens, s.vision_d
    per_layer = 2 * n * (4 * dv * dv + 2 * n * dv + s.vision_mlp_matrices * dv * s.vision_ffn)
    vision = images * (2 * s.vision_patches * s.vision_patch_flops + s.vision_layers * per_layer)
    projector = images * s.vision_patches * 2 * (dv * s.d + s.d * s.d)
    return [
        Term("vision", vision, s.train_vision, s.train_vision),
        Term("projector", projector, s.train_vision, s.train_projector),
    ]


def _summary(terms: list[Term], training: bool) -> dict:
    by_name: dict[str, float] = {}
    for t in terms:
        by_name[t.name] = by_name.get(t.name, 0.0) + t.forward + (t.backward if training else 0.0)
    forward = sum(t.forward for t in terms)
    backward = sum(t.backward for t in terms) if training else 0.0
    return {"forward": forward, "backward": backward, "total": forward + backward, "by_term": by_name}


def training_flops(s: Shape, seq_lengths: list[int], images: int) -> dict:
    """FLOPs of one training step (forward + backward) over sequences of ``seq_lengths`` real tokens
    (image tokens included) holding ``images`` images in all; logits for every position."""
    tokens = sum(seq_lengths)
    pairs = sum(t * (t + 1) / 2 for t in seq_lengths)
    return _summary(image_terms(s, images) + lm_terms(s, tokens, pairs, tokens), training=True)


def generation_flops(
    s: Shape, batch: int, prompt_len: int, new_tokens: int, images_per_prompt: int = 1
) -> dict:
    """FLOPs of one ``generate`` call: prefill of ``batch`` prompts of ``prompt_len`` tokens, then
    ``new_tokens - 1`` decode steps (the first new token comes from the prefill's logits)."""
    terms = image_terms(s, batch * images_per_prompt)
    terms += lm_terms(s, batch * prompt_len, batch * prompt_len * (prompt_len + 1) / 2, batch)
    for step in range(1, new_tokens):
        terms += lm_terms(s, batch, batch * (prompt_len + step), batch)
    return _summary(terms, training=False)


def decode_weight_bytes(s: Shape, batch: int, bytes_per_param: int = 4) -> float:
    """LM weight bytes one decode step reads: each dense matrix once (the LM head included), and per
    MoE layer the router plus the experts the step's ``batch`` tokens touch, E (1 - (1 - k/E)^batch)
    of them on average under uniform routing (k at batch 1, nearly all E at batch 8 with E=4, k=2).

    Small-batch decoding on a CPU is bound by reading these weights rather than by FLOPs, so
    ``bytes(dense) / bytes(MoE)`` is what the tokens/s ratio approaches there; it equals the FLOP
    ratio at batch 1 and falls below it as soon as a step touches more than k experts.
    """
    attn = s.d * s.q_dim + 2 * s.d * s.kv_dim + s.q_dim * s.d
    ffn = s.ffn_matrices * s.d * s.ffn
    params = s.layers * attn + s.d * s.vocab
    for i in range(s.layers):
        if i in s.moe_layers:
            touched = s.num_experts * (1 - (1 - s.top_k / s.num_experts) ** batch)
            params += touched * ffn + s.d * s.num_experts
        else:
            params += ffn
    return params * bytes_per_param
