"""SparseMoeBlock's two expert paths compute the same thing; the automatic choice and layout recognition.

The grouped-GEMM path is chosen automatically only on Hopper GPUs in bf16; here it is forced on
CPU (where torch runs grouped_mm as a loop) to check it against the per-expert loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, PhiConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi.modeling_phi import PhiMLP

from moe_llava.model.moe import SparseMoeBlock, grouped_layout
from moe_llava.model.moe.experts import grouped_mm_function

D, FFN = 64, 128

pytestmark = pytest.mark.skipif(grouped_mm_function() is None, reason="this torch has no grouped GEMM")


def _dense(activation):
    if activation == "swiglu":
        return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=FFN, hidden_act="silu"))
    return PhiMLP(PhiConfig(hidden_size=D, intermediate_size=FFN, hidden_act="gelu_new"))


def _perturb(block, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.add_((torch.randn(p.shape, generator=generator) * 0.3 * p.float().std()).to(p.dtype))
        block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=generator) * D**-0.5)


def _pair(activation, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    dense = _dense(activation).to(dtype)
    loop = SparseMoeBlock.from_dense(dense, num_experts=4, top_k=2, expert_path="loop", **kwargs)
    _perturb(loop, seed + 1)
    grouped = SparseMoeBlock.from_dense(dense, num_experts=4, top_k=2, expert_path="grouped_mm", **kwargs)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _forward_backward(block, x, grad):
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out.float() * grad.float()).sum().add(block.aux_loss).backward()
    return out, x.grad, [p.grad for p in block.parameters()]


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("capacity_factor", "padding"), [(None, False), (0.5, False), (1.5, True)])
def test_grouped_path_matches_loop_path(activation, dtype, capacity_factor, padding):
    loop, grouped = _pair(activation, dtype, capacity_factor=capacity_factor)
    x = torch.randn(3, 40, D, dtype=dtype)
    grad = torch.randn_like(x)
    if padding:
        mask = torch.ones(3, 40, dtype=torch.bool)
        mask[1, 25:] = False
        loop.padding_mask = grouped.padding_mask = mask
    out_l, gx_l, grads_l = _forward_backward(loop.train(), x, grad)
    out_g, gx_g, grads_g = _forward_backward(grouped.train(), x, grad)
    assert (loop.last_expert_path, grouped.last_expert_path) == ("loop", "grouped_mm")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _rel(out_g, out_l) <= tol and _rel(gx_g, gx_l) <= tol
    for g_l, g_g in zip(grads_l, grads_g):
        assert g_l is not None and g_g is not None and _rel(g_g, g_l) <= tol
    assert torch.equal(loop.last_stats.kept, grouped.last_stats.kept)


def test_grouped_path_keeps_experts_without_tokens_in_the_graph():
    loop, grouped = _pair("swiglu", torch.float32)
    with torch.no_grad():  # expert 3 never wins: its router row is far below the others for x > 0
        for block in (loop, grouped):
            block.router.weight.zero_()
            block.router.weight[3] = -1.0
    x = torch.rand(2, 16, D) + 0.1
    _forward_backward(grouped.train(), x, torch.randn_like(x))
    assert grouped.last_stats.kept[3] == 0
    for p in grouped.experts[3].parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    out_l, _, _ = _forward_backward(loop.train(), x, torch.randn_like(x))
    torch.testing.assert_close(grouped(x), out_l, atol=1e-5, rtol=1e-5)


def test_automatic_path_on_cpu_is_the_loop():
    torch.manual_seed(0)
    block = SparseMoeBlock.from_dense(_dense("swiglu").to(torch.bfloat16), num_experts=4, top_k=2)
    assert block.expert_path == "auto" and block.last_expert_path is None
    assert block.resolve_expert_path(torch.randn(4, D, dtype=torch.bfloat16)) == "loop"
    assert block.resolve_expert_path(torch.randn(4, D)) == "loop"
    block(torch.randn(4, D, dtype=torch.bfloat16))
    assert block.last_expert_path == "loop"


def test_layout_recognition_is_strict():
    block, _ = _pair("swiglu", torch.float32)
    assert grouped_layout(block.experts) == block.experts.layout == "gated"
    gelu, _ = _pair("gelu", torch.float32)
    assert grouped_layout(gelu.experts) == "plain"

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(D, D)

        def forward(self, x):
            return self.w(x)

    assert grouped_layout(SparseMoeBlock.from_dense(Custom(), num_experts=2, top_k=1).experts) is None
    with pytest.raises(ValueError, match="expert_path"):
        SparseMoeBlock.from_dense(Custom(), num_experts=2, top_k=1, expert_path="grouped_mm")
    with pytest.raises(ValueError, match="expert_path"):
        SparseMoeBlock.from_dense(_dense("swiglu"), expert_path="grouped")


def test_grouped_path_refuses_a_replaced_child():
    _, grouped = _pair("swiglu", torch.float32)
    x = torch.randn(2, 8, D)

    class Scaled(nn.Module):  # a replaced child: not a plain nn.Linear any more
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, h):
            return 2 * self.linear(h)

    grouped(x)
    grouped.experts[2].down_proj = Scaled(grouped.experts[2].down_proj)
    assert grouped_layout(grouped.experts) is None
    with pytest.raises(ValueError, match="recognised FFN layout"):
        grouped(x)


def test_a_look_alike_with_another_formula_is_not_recognised():
    dense = _dense("swiglu")

    class Swapped(LlamaMLP):
        def forward(self, x):  # same children, different math: up and gate swapped
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    dense.__class__ = Swapped
    assert grouped_layout([dense, copy.deepcopy(dense)]) is None
    with pytest.raises(ValueError, match="recognised FFN layout"):
        SparseMoeBlock.from_dense(dense, num_experts=2, expert_path="grouped_mm")
    assert SparseMoeBlock.from_dense(_dense("swiglu"), num_experts=2).experts.layout == "gated"
