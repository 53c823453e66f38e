"""The bench-size model, its stage-3 upcycled twin, synthetic batches and the training step.

The bench model is the project's model class at a realistic small size: a Llama-style (SwiGLU)
language model (default d_model 512, FFN 2048, 4 layers, 8 heads, vocabulary 1024 like the
ShapesWorld tokenizer) behind the tiny recipe's CLIP vision tower (``conf/model/tiny.yaml``: 64x64
images, 8x8 patches = 64 image tokens) and the ``mlp2x_gelu`` projector. The MoE twin is a copy
upcycled with the paper's MoE settings (``conf/moe/paper.yaml``: 4 experts, top-2, every other
layer, capacity 1.5 in training and 2.0 in evaluation), so both start from the same weights. The
trainable sets, learning rates and clipping are the stage configs' (``conf/stage/stage2.yaml`` for
the dense model, ``stage3.yaml`` for the MoE model).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from moe_llava.constants import IGNORE_INDEX
from moe_llava.model.builder import build_model
from moe_llava.model.moe import moe_blocks
from moe_llava.paths import CONF_DIR
from moe_llava.training.lit_module import MODEL_INPUTS
from moe_llava.training.stages import configure_trainable, split_moe_settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSize:
    d_model: int = 512
    ffn: int = 2048
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    max_positions: int = 2048


def load_conf(*parts: str):
    """One YAML file of the project's Hydra configs, plain (no composition needed for these)."""
    return OmegaConf.load(CONF_DIR.joinpath(*parts))


def moe_settings() -> tuple[dict, dict]:
    """(upcycling kwargs, loss coefficients) of the paper's MoE layout (``conf/moe/paper.yaml``)."""
    return split_moe_settings(OmegaConf.to_container(load_conf("moe", "paper.yaml"), resolve=True))


def stage_settings(stage: str) -> dict:
    """The stage config (``conf/stage/<stage>.yaml``) as a dict: trainable groups, lr, clipping ..."""
    return OmegaConf.to_container(load_conf("stage", f"{stage}.yaml"), resolve=True)


def build_dense(size: ModelSize, seed: int = 0, device: torch.device | str = "cpu"):
    """The dense bench model (random init): tiny recipe vision tower + a Llama LM of ``size``."""
    tiny = load_conf("model", "tiny.yaml")
    language_model = {
        "name_or_path": None,
        "config": {
            "model_type": "llama",
            "hidden_size": size.d_model,
            "intermediate_size": size.ffn,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.heads,
            "max_position_embeddings": size.max_positions,
            "vocab_size": size.vocab,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    }
    torch.manual_seed(seed)
    model = build_model(
        tiny.vision_tower,
        language_model,
        pretrained=False,
        vision_feature_layer=int(tiny.vision_feature_layer),
    )
    return model.to(device)


def upcycled_copy(dense):
    """A stage-3 model: a copy of ``dense`` upcycled with the paper's MoE settings."""
    settings, coefficients = moe_settings()
    moe = copy.deepcopy(dense)
    moe.upcycle(**settings)
    for key, value in coefficients.items():
        setattr(moe.config, key, value)
    return moe


@contextlib.contextmanager
def dropless(model):
    """Temporarily no capacity limit in the model's MoE blocks (for exact comparisons)."""
    blocks = [block for _, block in moe_blocks(model)]
    saved = [(b.capacity_factor, b.eval_capacity_factor) for b in blocks]
    for b in blocks:
        b.capacity_factor = b.eval_capacity_factor = None
    try:
        yield model
    finally:
        for b, (train_cf, eval_cf) in zip(blocks, saved):
            b.capacity_factor, b.eval_capacity_factor = train_cf, eval_cf


def record_expert_paths(model) -> set[str]:
    """A set that fills with the expert path each MoE block of ``model`` takes on every forward from
    now on (``loop`` / ``grouped_mm``): what was really measured, not what a probe would pick."""
    taken: set[str] = set()
    for _, block in moe_blocks(model):
        decide = block._expert_path

        def recording(x, decide=decide):
            path = decide(x)
            taken.add(path)
            return path

        block._expert_path = recording
    return taken


def expert_path_for(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The expert path ``SparseMoeBlock`` picks for Llama-style experts on ``device`` / ``dtype``."""
    from bench.layers import make_dense_ffn
    from moe_llava.model.moe import SparseMoeBlock

    block = SparseMoeBlock.from_dense(make_dense_ffn("swiglu", 64, 128), num_experts=4, top_k=2)
    block = block.to(device=device, dtype=dtype)
    return expert_paths_of_blocks([block], dtype)[0]


def expert_paths_of_blocks(blocks, dtype: torch.dtype) -> list[str]:
    paths = set()
    for block in blocks:
        weight = next(block.experts.parameters())
        probe = torch.zeros(2, block.router.in_features, device=weight.device, dtype=dtype)
        decide = getattr(block, "_expert_path", None)
        paths.add(decide(probe) if decide is not None else "loop")
    return sorted(paths)


def synthetic_batch(model, batch_size: int, seq_len: int, seed: int = 0, device="cpu") -> dict:
    """A training batch: per sample one text token, one image, then text; loss on the second half.

    ``seq_len`` counts every token, the image's ``num_image_tokens`` included; no padding.
    """
    n_img = model.num_image_tokens
    if seq_len < n_img + 2:
        raise ValueError(f"seq_len={seq_len} leaves no room for text around {n_img} image tokens")
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(image_id, vocab), (batch_size, seq_len), generator=g)
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g).to(device),
        "image_mask": (ids == image_id).to(device),
    }


def prompts(model, batch_size: int, text_len: int, seed: int = 0, device="cpu") -> dict:
    """Generation prompts of equal length (no padding): one text token, one image, ``text_len`` tokens."""
    batch = synthetic_batch(model, batch_size, 1 + model.num_image_tokens + text_len, seed, device)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}


def autocast_context(precision: str | torch.dtype | None, device: torch.device):
    """Lightning-style precision: ``32-true`` / float32 (no autocast) or ``bf16-mixed`` / bfloat16."""
    if precision in (None, "32-true", "32", "float32", torch.float32):
        return contextlib.nullcontext()
    if precision in ("bf16-mixed", "bfloat16", torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unsupported precision {precision!r} (32-true or bf16-mixed)")


class TrainStep:
    """What one Lightning training step of :class:`MoELlavaLitModule` runs, without the Trainer:
    forward (the module's inputs), backward of the loss, gradient clipping (the stage's
    ``max_grad_norm``, as the Trainer's ``gradient_clip_val``), ``AdamW.step`` and ``zero_grad``.
    """

    def __init__(
        self,
        model,
        *,
        lr: float,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        precision=None,
    ):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.device = next(model.parameters()).device
        self.last_loss: torch.Tensor | None = None

    @classmethod
    def for_stage(cls, model, stage: dict, precision=None, patterns=None) -> TrainStep:
        """Freeze/unfreeze ``model`` as the stage config says (or by ``train_modules`` ``patterns``),
        and step with its optimizer settings."""
        configure_trainable(model, stage["trainable"], patterns)
        return cls(
            model,
            lr=float(stage["lr"]),
            weight_decay=float(stage.get("weight_decay", 0.0)),
            max_grad_norm=stage.get("max_grad_norm") or None,
            precision=precision,
        )

    def __call__(self, batch: dict) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            out = self.model(**{key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None})
        out.loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = out.loss.detach()
        return self.last_loss


def trainable_snapshot(model) -> dict[str, tuple[bool, torch.Tensor]]:
    """Copies of the first trainable and the first frozen weight of each part of the model (vision
    tower, projector, LM attention, LM FFN/experts, ...), to check what a step changed."""
    picked: dict[str, tuple[bool, torch.Tensor]] = {}
    seen = set()
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if ".self_attn." in name:
            part += ".attention"
        elif ".mlp." in name:
            part += ".ffn"
        key = (part, p.requires_grad)
        if key not in seen and p.dim() > 1:
            picked[name] = (p.requires_grad, p.detach().clone())
            seen.add(key)
    return picked


def changed_as_expected(model, snapshot: dict[str, tuple[bool, torch.Tensor]]) -> tuple[bool, dict]:
    """Trainable parameters moved, frozen ones did not."""
    params = dict(model.named_parameters())
    detail = {}
    ok = True
    for name, (trainable, before) in snapshot.items():
        moved = not torch.equal(params[name].detach(), before)
        detail[name] = {"trainable": trainable, "changed": moved}
        ok &= moved == trainable
    return ok, detail
