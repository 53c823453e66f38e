"""Parameter counts: total and activated per token (MoE blocks activate top_k of their experts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moe_llava.model.moe import moe_blocks


@dataclass(frozen=True)
class ParameterCount:
    total: int
    activated: int
    parts: dict[str, ParameterCount] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"total": self.total, "activated": self.activated}
        out.update({name: part.as_dict() for name, part in self.parts.items()})
        return out


def _count(module: nn.Module) -> ParameterCount:
    # `parameters()` yields a tied tensor once; numel() works on the meta device.
    total = sum(p.numel() for p in module.parameters())
    inactive = 0
    for _, block in moe_blocks(module):
        per_expert = sum(p.numel() for p in block.experts[0].parameters())
        inactive += (block.num_experts - block.top_k) * per_expert
    return ParameterCount(total=total, activated=total - inactive)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts for an ``MoELlavaForCausalLM`` (with ``parts``: vision_tower / projector / language_model)
    or for any other module such as a bare (upcycled) language model."""
    part_names = ("vision_tower", "projector", "language_model")
    if not all(isinstance(getattr(model, name, None), nn.Module) for name in part_names):
        return _count(model)
    parts = {name: _count(getattr(model, name)) for name in part_names}
    return ParameterCount(
        total=sum(p.total for p in parts.values()),
        activated=sum(p.activated for p in parts.values()),
        parts=parts,
    )


def _unique_tensors(model: nn.Module) -> dict[str, object]:
    """Name -> tensor of the state dict, a tied tensor once (as safetensors stores it)."""
    seen: set[tuple] = set()
    unique = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (id(tensor),)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def storage_bytes(model: nn.Module, trainable: set[str], export_dtype) -> dict[str, int]:
    """What one stage of ``model`` writes, computed from shapes (works on the ``meta`` device).

    * ``export``: the stage export's weights in ``export_dtype`` (the ``_keep_in_fp32_modules``,
      the routers, in float32);
    * ``checkpoint``: one Lightning checkpoint of a single-file strategy (ddp, fsdp with a full
      state dict): float32 weights of every parameter plus AdamW's two float32 moments per
      trainable one (the ``trainable`` parameter names);
    * ``checkpoint_zero2_total``: the same under DeepSpeed ZeRO-2 (bf16-mixed), over all ranks:
      bfloat16 weights, a float32 master copy and two moments per trainable parameter.
    """
    import torch

    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    size = torch.empty((), dtype=export_dtype).element_size()
    export = checkpoint = zero2 = 0
    for name, tensor in _unique_tensors(model).items():
        n = tensor.numel()
        fp32 = any(f".{m}." in f".{name}" for m in keep) or not tensor.is_floating_point()
        export += n * (tensor.element_size() if fp32 else size)
        checkpoint += n * 4
        zero2 += n * 2
        if name in trainable:
            checkpoint += n * 8
            zero2 += n * 12
    return {"export": export, "checkpoint": checkpoint, "checkpoint_zero2_total": zero2}
