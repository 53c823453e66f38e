"""The experts of an MoE block and the two ways to run them on the tokens routed to them.

* ``loop``: call each expert module on its slice of the tokens. Works for any FFN module, runs
  its forward hooks, and is the fast way on CPU (where a grouped GEMM is itself a loop).
* ``grouped_mm``: for experts of a recognised layout (:data:`GROUPED_LAYOUTS`), one grouped GEMM
  per projection over the experts' stacked weights, with no host synchronisation. It computes the
  layout's formula from the experts' weights and activation, so expert modules' forwards and
  hooks are not called.

The experts stay separate modules with the dense FFN's class and parameter names, so an MoE
checkpoint holds each expert exactly as the dense FFN it was upcycled from, and the loop, expert
hooks and name-based trainable sets work on any FFN. The price is on the grouped path only: it
stacks the experts' weights on every forward (a copy of them), where stacked parameters (as
``transformers``' and torchtitan's experts keep) would not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_llava.model.moe.router import Routing


@dataclass(frozen=True)
class Layout:
    """Child names of an FFN layout: ``output(act(inputs[0](x)) [* inputs[1](x)])``."""

    inputs: tuple[str, ...]
    output: str
    activation: str


# The FFN layouts the grouped path computes, named by their children as `transformers` names them.
GROUPED_LAYOUTS = {
    "gated": Layout(inputs=("gate_proj", "up_proj"), output="down_proj", activation="act_fn"),  # Llama
    "plain": Layout(inputs=("fc1",), output="fc2", activation="activation_fn"),  # Phi
}


def grouped_mm_function():
    """torch's public grouped GEMM, ``F.grouped_mm``; None in a torch build without it."""
    return getattr(F, "grouped_mm", None)


def grouped_layout(experts: list[nn.Module]) -> str | None:
    """The name of the layout of :data:`GROUPED_LAYOUTS` that ``experts`` have, else None.

    Recognised: experts of one ``transformers`` FFN class (whose children of these names compute
    the layout's formula; a look-alike class elsewhere may not) whose children are plain
    ``nn.Linear``s of equal shapes and biases, with one activation type.
    """
    classes = {type(e) for e in experts}
    if len(classes) != 1 or not next(iter(classes)).__module__.startswith("transformers."):
        return None
    for name, layout in GROUPED_LAYOUTS.items():
        names = (*layout.inputs, layout.output)
        if not all(type(getattr(e, n, None)) is nn.Linear for e in experts for n in names):
            continue
        signature = {
            tuple((getattr(e, n).weight.shape, getattr(e, n).bias is None) for n in names) for e in experts
        }
        activations = {type(getattr(e, layout.activation, None)) for e in experts}
        if len(signature) == 1 and len(activations) == 1 and callable(getattr(experts[0], layout.activation)):
            return name
    return None


class Experts(nn.ModuleList):
    """The expert FFNs (any module mapping (n, d) to (n, d)), run on the rows routed to them.

    Attributes:
        layout: the :data:`GROUPED_LAYOUTS` name the experts have (see :func:`grouped_layout`),
            found at construction; None when only the loop can run them.
    """

    def __init__(self, experts: list[nn.Module]):
        super().__init__(experts)
        self.layout = grouped_layout(experts)

    def aligned_for_grouped_mm(self) -> bool:
        """Whether every projection's sizes keep bf16 rows 16-byte aligned, as the GPU grouped GEMM
        kernels need."""
        layout = GROUPED_LAYOUTS[self.layout]
        first = self[0]
        return all(
            size % 8 == 0 for n in (*layout.inputs, layout.output) for size in getattr(first, n).weight.shape
        )

    def forward(self, x: torch.Tensor, routing: Routing, path: str) -> torch.Tensor:
        """Per token of ``x`` (S, d): the sum over its kept assignments of gate x expert(token)."""
        token_idx = routing.token_idx
        if path == "grouped_mm":
            # Gather the tokens grouped by expert, run all experts at once, add the gated rows back.
            expert_out = self._grouped(x.index_select(0, token_idx), routing.kept)
            out = x.new_zeros(x.shape, dtype=expert_out.dtype)
            return out.index_add_(0, token_idx, expert_out * routing.gate.unsqueeze(-1).to(expert_out.dtype))
        return self._loop(x, token_idx, routing.gate, routing.kept)

    def _loop(self, x, token_idx, gate, kept) -> torch.Tensor:
        counts = kept.tolist()
        # Under autocast the experts' linears return the autocast dtype.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        out = x.new_zeros(x.shape, dtype=dtype)
        gate = gate.to(dtype).unsqueeze(-1)
        # With autograd every expert runs, even on zero rows, so all parameters are in the graph
        # (plain DDP needs no find_unused_parameters). Without it (inference) empty experts are
        # skipped, most of them when decoding one token, and the gate scales the fresh output in
        # place. Each expert's output is added into `out` on its own: no (k*S, d) concatenation.
        inference = not torch.is_grad_enabled()
        chunks = zip(
            self, x.index_select(0, token_idx).split(counts), token_idx.split(counts), gate.split(counts)
        )
        for expert, rows, idx, g in chunks:
            if inference and rows.shape[0] == 0:
                continue
            expert_out = expert(rows).to(dtype)
            out.index_add_(0, idx, expert_out.mul_(g) if inference else expert_out * g)
        return out

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert applied to its ``counts`` rows of ``rows`` (grouped by expert) with one
        grouped GEMM per projection; autograd reaches each expert's own parameters."""
        if self.layout is None:
            raise ValueError("expert_path='grouped_mm' needs experts with a recognised FFN layout")
        layout = GROUPED_LAYOUTS[self.layout]
        grouped_mm = grouped_mm_function()
        offsets = counts.cumsum(0).to(torch.int32)  # stays on the device: no host sync
        linears = [[_plain_linear(e, n) for n in (*layout.inputs, layout.output)] for e in self]
        row_expert = None
        if any(lin.bias is not None for lin in linears[0]):  # biases are added per row, from its expert
            row_expert = torch.repeat_interleave(
                torch.arange(len(self), device=rows.device), counts, output_size=rows.shape[0]
            )

        def project(h: torch.Tensor, which: slice) -> torch.Tensor:
            # One grouped GEMM for the linears in `which` (gate and up fused into one).
            weight = torch.stack([torch.cat([lin.weight for lin in ls[which]]) for ls in linears])
            out = grouped_mm(h, weight.transpose(-2, -1), offs=offsets)
            if row_expert is not None:
                bias = torch.stack([torch.cat([_bias(lin) for lin in ls[which]]) for ls in linears])
                out = out + bias.index_select(0, row_expert)
            return out

        num_inputs = len(layout.inputs)
        h = project(rows, slice(0, num_inputs))
        act = getattr(self[0], layout.activation)
        if num_inputs == 2:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return project(h.contiguous(), slice(num_inputs, num_inputs + 1))


def _plain_linear(expert: nn.Module, name: str) -> nn.Linear:
    """``expert.<name>``, which the grouped path can only compute when it is still a plain ``nn.Linear``."""
    child = getattr(expert, name, None)
    if type(child) is not nn.Linear:
        raise ValueError(
            f"expert_path='grouped_mm' needs experts with a recognised FFN layout; "
            f"{name} is now {type(child).__name__}"
        )
    return child


def _bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias
    return linear.weight.new_zeros(linear.out_features)
