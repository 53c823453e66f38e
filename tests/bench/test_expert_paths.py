"""SparseMoeBlock's two expert paths compute the same thing; the automatic choice is guarded.

The grouped-GEMM path is chosen automatically only on Hopper GPUs in bf16; here it is forced on
CPU (where torch runs grouped_mm as a loop) to check it against the per-expert loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench import layers
from moe_llava.model.moe import SparseMoeBlock, _grouped_layout

D, FFN = 64, 128


def _pair(activation, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    dense = layers.make_dense_ffn(activation, D, FFN).to(dtype)
    loop = SparseMoeBlock.from_dense(dense, num_experts=4, top_k=2, **kwargs)
    layers.perturb_experts(loop, scale=0.3, seed=seed + 1)
    grouped = copy.deepcopy(loop)
    grouped._expert_path_override = "grouped_mm"
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
    block, _ = _pair("swiglu", torch.bfloat16)
    assert block._expert_path(torch.randn(4, D, dtype=torch.bfloat16)) == "loop"
    assert block._expert_path(torch.randn(4, D)) == "loop"


def test_layout_recognition_is_strict():
    block, _ = _pair("swiglu", torch.float32)
    assert _grouped_layout(block.experts) == "gated"
    gelu, _ = _pair("gelu", torch.float32)
    assert _grouped_layout(gelu.experts) == "plain"

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(D, D)

        def forward(self, x):
            return self.w(x)

    assert _grouped_layout(SparseMoeBlock.from_dense(Custom(), num_experts=2, top_k=1).experts) is None
    handle = block.experts[1].down_proj.register_forward_hook(lambda *args: None)
    assert _grouped_layout(block.experts) is None  # a hook must see its module called
    handle.remove()
    assert _grouped_layout(block.experts) == "gated"


def test_cached_layout_follows_hooks_and_replaced_children():
    block, grouped = _pair("swiglu", torch.float32)
    x = torch.randn(2, 8, D)
    assert block._experts_layout() == _grouped_layout(block.experts) == "gated"
    handle = block.experts[0].gate_proj.register_forward_hook(lambda *args: None)
    assert block._experts_layout() is None  # a hook must see its module called
    handle.remove()
    assert block._experts_layout() == "gated"

    class Scaled(nn.Module):  # a replaced child: not a plain nn.Linear any more
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, h):
            return 2 * self.linear(h)

    grouped(x)
    grouped.experts[2].down_proj = Scaled(grouped.experts[2].down_proj)
    assert grouped._experts_layout() is None and _grouped_layout(grouped.experts) is None
    with pytest.raises(ValueError, match="recognised FFN layout"):
        grouped(x)


def test_grouped_self_check_rejects_a_look_alike_with_another_formula():
    block, _ = _pair("swiglu", torch.float32)

    class Swapped(type(block.experts[0])):
        def forward(self, x):  # same children, different math: up and gate swapped
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    for expert in block.experts:
        expert.__class__ = Swapped
    assert _grouped_layout(block.experts) == "gated"
    assert block._grouped_self_check(torch.randn(4, D), "gated") is False
    fine, _ = _pair("swiglu", torch.float32)
    assert fine._grouped_self_check(torch.randn(4, D), "gated") is True
