"""The FFNs and MoE layers the layer benchmark compares, built with identical weights.

* ``dense``: a real ``transformers`` FFN of a small model (``LlamaMLP``: SwiGLU; ``PhiMLP``:
  GELU with biases, Phi-2's ``gelu_new``), the module the experts are upcycled from.
* ``moe``: :class:`moe_llava.model.SparseMoeBlock` upcycled from it (E experts, top-k).
* ``mixtral_<impl>``: ``transformers``' own ``MixtralSparseMoeBlock`` (stacked ``gate_up_proj`` /
  ``down_proj`` expert weights, fused gate+up GEMM) with our experts' weights and router copied in,
  for each ``experts_implementation`` (``eager`` loop, ``grouped_mm``, ``batched_mm``).
* ``expert_gemm_floor``: only the experts' GEMMs (gate+up fused), the floor under every peer.
* ``deepspeed_einsum``: :class:`EinsumTop2Moe`, the GShard/DeepSpeed ``top2gating`` one-hot
  ``einsum`` dispatch over a (tokens x experts x capacity) tensor, written here as the reference
  baseline (it is what MoE-LLaVA's reference implementation runs).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_llava.model.moe import _GROUPED_LAYOUTS, SparseMoeBlock, _grouped_layout

ACTIVATIONS = ("swiglu", "gelu")
MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def make_dense_ffn(activation: str, d_model: int, ffn: int) -> nn.Module:
    """A dense FFN as ``transformers`` builds it (fp32, CPU; move it afterwards)."""
    if activation == "swiglu":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        return LlamaMLP(LlamaConfig(hidden_size=d_model, intermediate_size=ffn, hidden_act="silu"))
    if activation == "gelu":
        from transformers import PhiConfig
        from transformers.models.phi.modeling_phi import PhiMLP

        return PhiMLP(PhiConfig(hidden_size=d_model, intermediate_size=ffn, hidden_act="gelu_new"))
    raise ValueError(f"unknown activation={activation!r}; expected one of {ACTIVATIONS}")


def ffn_matmul_flops_per_token(activation: str, d_model: int, ffn: int) -> int:
    """Forward multiply-add FLOPs of one FFN application (2 per MAC; elementwise ops not counted)."""
    matrices = 3 if activation == "swiglu" else 2
    return 2 * matrices * d_model * ffn


def perturb_experts(block: SparseMoeBlock, scale: float = 0.02, seed: int = 1) -> None:
    """Make the upcycled experts differ (in place) so that a routing mistake changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert in block.experts:
            for p in expert.parameters():
                noise = torch.randn(p.shape, generator=generator) * scale * p.float().std().clamp_min(1e-3)
                p.add_(noise.to(device=p.device, dtype=p.dtype))
        weight = block.router.weight
        weight.copy_(torch.randn(weight.shape, generator=generator).to(weight) * weight.shape[1] ** -0.5)


# ---------------------------------------------------------------------------- transformers Mixtral
def mixtral_from_block(block: SparseMoeBlock, implementation: str) -> nn.Module:
    """``MixtralSparseMoeBlock`` computing what ``block`` computes, with its SwiGLU experts copied in.

    Mixtral stores every expert's ``[gate; up]`` weights in one ``gate_up_proj`` (E, 2F, d) and
    ``down_proj`` (E, d, F). Its router (softmax in fp32, top-k, renormalised) matches ours except
    that it computes the router logits in the model dtype (ours: always fp32).
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    first = block.experts[0]
    if not all(hasattr(first, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError("Mixtral's block only has SwiGLU (gate/up/down) experts")
    d_model, ffn = first.gate_proj.in_features, first.gate_proj.out_features
    hidden_act = getattr(getattr(first, "config", None), "hidden_act", "silu")
    config = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=ffn,
        num_local_experts=block.num_experts,
        num_experts_per_tok=block.top_k,
        hidden_act=hidden_act,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    weight = first.gate_proj.weight
    mixtral = MixtralSparseMoeBlock(config).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        mixtral.gate.weight.copy_(block.router.weight)
        for i, expert in enumerate(block.experts):
            mixtral.experts.gate_up_proj[i].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            mixtral.experts.down_proj[i].copy_(expert.down_proj.weight)
    return mixtral


def reference_routing(block: SparseMoeBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless top-k routing as ``SparseMoeBlock`` computes it: fp32 logits, softmax, top-k, renormalised."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = F.linear(tokens.float(), block.router.weight.float()).softmax(dim=-1)
    weights, index = probs.topk(block.top_k, dim=-1)
    if block.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights


def mixtral_batched_mm_bytes(tokens: int, block: SparseMoeBlock, backward: bool) -> int:
    """Bytes ``batched_mm`` materialises: one copy of the chosen expert's weights per token and slot."""
    per_expert = sum(p.numel() * p.element_size() for p in block.experts[0].parameters())
    return tokens * block.top_k * per_expert * (2 if backward else 1)


# ---------------------------------------------------------------------------- DeepSpeed / GShard
class EinsumTop2Moe(nn.Module):
    """DeepSpeed-MoE ``top2gating`` + ``MOELayer`` one-hot ``einsum`` dispatch (the reference baseline).

    Written after DeepSpeed's ``sharded_moe.py``: capacity ``C = max(min_capacity,
    ceil(S / E * capacity_factor * 2))``; slots are filled top-1 first, then top-2, in token order
    (cumsum of one-hot masks); the kept gates are renormalised; tokens are dispatched with
    ``einsum("sec,sm->ecm")`` and combined with ``einsum("sec,ecm->sm")`` over a dense (S, E, C)
    weight tensor, so dispatch costs O(S * E * C * d) = O(S^2 d) and memory O(S^2). Expert
    computation runs on all E * C slots, empty ones included. No Gumbel noise (deterministic).
    """

    def __init__(self, block: SparseMoeBlock, capacity_factor: float = 1.5, min_capacity: int = 0):
        super().__init__()
        if block.top_k != 2:
            raise ValueError("EinsumTop2Moe implements top-2 gating only")
        self.experts = copy.deepcopy(block.experts)
        self.router = copy.deepcopy(block.router)
        self.num_experts = block.num_experts
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity

    def capacity(self, num_tokens: int) -> int:
        return max(self.min_capacity, math.ceil(num_tokens / self.num_experts * self.capacity_factor * 2))

    def gating(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(combine_weights (S, E, C) fp32, dispatch_mask (S, E, C) bool, capacity)."""
        logits = F.linear(x.float(), self.router.weight.float())
        gates = logits.softmax(dim=1)
        num_tokens, num_experts = gates.shape
        capacity = self.capacity(num_tokens)

        indices1 = gates.argmax(dim=1)
        mask1 = F.one_hot(indices1, num_experts)
        logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
        indices2 = logits_except1.argmax(dim=1)
        mask2 = F.one_hot(indices2, num_experts)

        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        mask1 = mask1 * (locations1 < capacity)
        mask2 = mask2 * (locations2 < capacity)
        locations1_s = (locations1 * mask1).sum(dim=1)
        locations2_s = (locations2 * mask2).sum(dim=1)

        mask1_float, mask2_float = mask1.float(), mask2.float()
        gates1_s = torch.einsum("se,se->s", gates, mask1_float)
        gates2_s = torch.einsum("se,se->s", gates, mask2_float)
        denom_s = (gates1_s + gates2_s).clamp(min=torch.finfo(gates.dtype).eps)
        gates1_s, gates2_s = gates1_s / denom_s, gates2_s / denom_s

        gates1 = torch.einsum("s,se->se", gates1_s, mask1_float)
        gates2 = torch.einsum("s,se->se", gates2_s, mask2_float)
        locations1_sc = F.one_hot(locations1_s, capacity).float()
        locations2_sc = F.one_hot(locations2_s, capacity).float()
        combine1_sec = torch.einsum("se,sc->sec", gates1, locations1_sc)
        combine2_sec = torch.einsum("se,sc->sec", gates2, locations2_sc)
        combine_weights = combine1_sec + combine2_sec
        return combine_weights, combine_weights.bool(), capacity

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        combine_weights, dispatch_mask, _ = self.gating(x)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.type_as(x), x)  # (E, C, d)
        expert_output = torch.stack([expert(dispatched[e]) for e, expert in enumerate(self.experts)])
        out = torch.einsum("sec,ecm->sm", combine_weights.type_as(x), expert_output)
        return out.view(hidden_states.shape)


def einsum_moe_bytes(tokens: int, num_experts: int, capacity_factor: float, backward: bool) -> int:
    """Rough peak of EinsumTop2Moe: bytes per element of its (S, E, C) tensors, measured with
    :mod:`bench.memory` at S = 1024..2048 (about 14 forward, 33 forward+backward), rounded up."""
    capacity = math.ceil(tokens / num_experts * capacity_factor * 2)
    return tokens * num_experts * capacity * (40 if backward else 16)


# ---------------------------------------------------------------------------- helpers
def experts_only_fn(block: SparseMoeBlock, x: torch.Tensor, grad: torch.Tensor | None):
    """A callable running only ``block``'s experts on the token slices ``block`` routes to them.

    The slices are gathered once, outside the timed call, from the same dropless routing; with
    ``grad`` the call also runs the experts' backward. Time(moe) - time(this) is what routing,
    dispatch, combine and statistics cost.
    """
    index, _ = reference_routing(block, x)
    tokens = x.reshape(-1, x.shape[-1])
    flat = index.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=block.num_experts).tolist()
    inputs = [chunk.contiguous() for chunk in tokens.index_select(0, order % tokens.shape[0]).split(counts)]
    grads = None
    if grad is not None:
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grads = [
            chunk.contiguous() for chunk in flat_grad.index_select(0, order % tokens.shape[0]).split(counts)
        ]

    def run() -> None:
        if grads is None:
            with torch.no_grad():
                for expert, chunk in zip(block.experts, inputs):
                    expert(chunk)
            return
        outputs = [
            expert(chunk.detach().requires_grad_(True)) for expert, chunk in zip(block.experts, inputs)
        ]
        torch.autograd.backward(outputs, grads)

    return run


def expert_gemm_floor_fn(block: SparseMoeBlock, x: torch.Tensor, grad: torch.Tensor | None):
    """The experts' matrix multiplies and nothing else: the least time any MoE implementation needs.

    Per expert, on the rows ``block``'s dropless routing of ``x`` gives it, plain ``torch.mm`` calls
    with the experts' own weights in their fastest form: a gated FFN's gate and up projections
    fused into one GEMM (as Mixtral stores them), then the output projection; with ``grad`` also
    every input- and weight-gradient GEMM. No activation, gating product, routing, gather or
    combine: those are work every implementation must still add, so T(any block) / T(this) is an
    upper bound on the speed-up any implementation running these GEMM kernels can have over it.
    Returns None when the experts have no recognised layout (see ``_GROUPED_LAYOUTS``).
    """
    layout = _grouped_layout(block.experts)
    if layout is None:
        return None
    inputs_names, output_name, _ = _GROUPED_LAYOUTS[layout]
    index, _ = reference_routing(block, x)
    counts = torch.bincount(index.reshape(-1), minlength=block.num_experts).tolist()
    dtype, device = x.dtype, x.device
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    with torch.no_grad():
        w_in = [
            torch.cat([getattr(e, n).weight for n in inputs_names]).detach().contiguous()
            for e in block.experts
        ]
        w_out = [getattr(e, output_name).weight.detach().contiguous() for e in block.experts]
    ffn = w_out[0].shape[1]
    xs = [rnd(n, w.shape[1]) for n, w in zip(counts, w_in)]
    hs = [rnd(n, ffn) for n in counts]
    grads_out = [rnd(n, w.shape[0]) for n, w in zip(counts, w_out)] if grad is not None else None
    grads_in = [rnd(n, w.shape[0]) for n, w in zip(counts, w_in)] if grad is not None else None

    def run() -> None:
        for e in range(len(counts)):
            torch.mm(xs[e], w_in[e].t())
            torch.mm(hs[e], w_out[e].t())
            if grads_out is not None:
                torch.mm(grads_out[e], w_out[e])  # grad of the output projection's input
                torch.mm(grads_out[e].t(), hs[e])  # grad of its weight
                torch.mm(grads_in[e], w_in[e])  # grad of the expert's input
                torch.mm(grads_in[e].t(), xs[e])  # grad of the (fused) input weights

    return run


def eager_moe_floor_fn(block: SparseMoeBlock, x: torch.Tensor, grad: torch.Tensor | None):
    """Forward only: the least an MoE block built from eager kernels must do once routing is decided.

    The routing (``block``'s dropless top-k of ``x``) is computed outside the timed call. The call
    then gathers every expert's rows at once, as the block does, and per expert runs its math in
    the cheapest eager form (gate and up as two GEMMs with the expert's own weights, which on CPU
    beats one fused GEMM whose halves are strided views; activation and gating product in place on
    the GEMMs' fresh outputs; the output GEMM), scales by the gate weights in place and adds into
    the output: what every sparse implementation (Mixtral's included) does, minus the routing
    decision and any bookkeeping. T(peer) / T(this) therefore bounds the speed-up over the peer of
    any implementation built from eager kernels, even one whose router is free. Returns None with
    ``grad`` (a backward has no cheaper eager form than autograd's) and when the experts have no
    recognised layout.
    """
    layout = _grouped_layout(block.experts)
    if grad is not None or layout is None:
        return None
    inputs_names, output_name, act_name = _GROUPED_LAYOUTS[layout]
    tokens = x.reshape(-1, x.shape[-1])
    index, weights = reference_routing(block, x)
    flat_expert = index.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=block.num_experts).tolist()
    rows = order % tokens.shape[0]
    rows_of = rows.split(counts)
    gates_of = weights.t().reshape(-1)[order].to(tokens.dtype).unsqueeze(-1).split(counts)
    activation = getattr(block.experts[0], act_name)
    in_place = _in_place_form(activation)

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = torch.zeros_like(tokens)
            gathered = tokens.index_select(0, rows).split(counts)  # one gather (faster than one per expert)
            for expert, h_in, rows_e, gates in zip(block.experts, gathered, rows_of, gates_of):
                first, *rest = (getattr(expert, n) for n in inputs_names)
                h = F.linear(h_in, first.weight, first.bias)
                h = in_place(h, inplace=True) if in_place is not None else activation(h)
                for linear in rest:  # the gating product
                    h.mul_(F.linear(h_in, linear.weight, linear.bias))
                down = getattr(expert, output_name)
                out.index_add_(0, rows_e, F.linear(h, down.weight, down.bias).mul_(gates))
            return out.view(x.shape)

    return run


def _in_place_form(activation: nn.Module):
    """``F.silu`` / ``F.relu`` (which take ``inplace=True``) when ``activation`` computes one of them, else None."""
    from transformers import activations

    silu = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))
    return F.silu if type(activation) in silu else F.relu if type(activation) is nn.ReLU else None


def gemm_ceiling_fn(activation: str, rows: int, d_model: int, ffn: int, dtype, device, backward: bool):
    """Plain ``torch.mm`` calls doing the same matmuls as the FFN on ``rows`` token rows, nothing else.

    Forward: (rows x d) @ (d x F) once per input matrix (2 for SwiGLU's gate and up, 1 for GELU),
    and (rows x F) @ (F x d). With backward, each matrix also gets its input-gradient and
    weight-gradient GEMMs. Its FLOP rate is the machine's ceiling for this shape.
    """
    n_in = 2 if activation == "swiglu" else 1
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, h = rnd(rows, d_model), rnd(rows, ffn)
    w_in = [rnd(d_model, ffn) for _ in range(n_in)]
    w_out = rnd(ffn, d_model)
    gy = rnd(rows, d_model)

    def run() -> None:
        for w in w_in:
            torch.mm(x, w)
        torch.mm(h, w_out)
        if backward:
            torch.mm(gy, w_out.t())  # grad of h
            torch.mm(h.t(), gy)  # grad of w_out
            for w in w_in:
                torch.mm(h, w.t())  # grad of x
                torch.mm(x.t(), h)  # grad of w_in

    return run
