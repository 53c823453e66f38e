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
