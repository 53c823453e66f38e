"""SparseMoeBlock: routing, capacity, losses, padding, statistics and gradients against a loop reference."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from moe_llava.model import SparseMoeBlock, moe_losses, set_routing_masks
from moe_llava.model.moe import router_losses_disabled

D, FFN = 16, 32


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, FFN)
        self.fc2 = nn.Linear(FFN, D)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def distinct_block(num_experts=4, top_k=2, seed=0, **kwargs) -> SparseMoeBlock:
    """A block whose experts differ on purpose, so routing mistakes change the output."""
    torch.manual_seed(seed)
    block = SparseMoeBlock.from_dense(GeluMLP(), num_experts=num_experts, top_k=top_k, **kwargs)
    with torch.no_grad():
        for expert in block.experts:
            for p in expert.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        block.router.weight.copy_(torch.randn_like(block.router.weight))
    return block


def reference_moe(block: SparseMoeBlock, x: torch.Tensor, capacity: int | None, valid=None):
    """Straightforward per-token loops: the reference's documented semantics."""
    tokens = x.reshape(-1, x.shape[-1])
    S, E, k = tokens.shape[0], block.num_experts, block.top_k
    valid = torch.ones(S, dtype=torch.bool) if valid is None else valid.reshape(-1)
    probs = torch.softmax(tokens.float() @ block.router.weight.float().t(), dim=-1)
    choices = [sorted(range(E), key=lambda e, t=t: -probs[t, e].item())[:k] for t in range(S)]
    used = [0] * E
    kept = [[False] * k for _ in range(S)]
    for rank in range(k):  # all top-1 assignments first, then top-2, each in token order
        for t in range(S):
            if not valid[t]:
                continue
            e = choices[t][rank]
            if capacity is None or used[e] < capacity:
                used[e] += 1
                kept[t][rank] = True
    out = torch.zeros_like(tokens)
    for t in range(S):
        gates = [probs[t, e].item() if kept[t][r] else 0.0 for r, e in enumerate(choices[t])]
        total = sum(gates)
        for r, e in enumerate(choices[t]):
            if gates[r] > 0:
                weight = gates[r] / total if block.router.renormalize else gates[r]
                out[t] += weight * block.experts[e](tokens[t : t + 1])[0]
    return out.view_as(x), kept, choices


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 1.5, 2.0])
def test_routing_matches_loop_reference(capacity_factor):
    block = distinct_block(capacity_factor=capacity_factor).train()
    x = torch.randn(3, 8, D)
    expected, _, _ = reference_moe(block, x, block.capacity(24))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_capacity_of_at_least_the_token_count_equals_dropless():
    # cf 2.0, top-2 of 4 (MoE-LLaVA's evaluation setting): C = S, and no expert can get more than
    # S assignments, so the block runs as dropless (no capacity bookkeeping), bit for bit.
    capped = distinct_block(capacity_factor=2.0).train()
    dropless = distinct_block(capacity_factor=None).train()
    x = torch.randn(2, 5, D)
    assert capped.capacity(10) == 10
    out = capped(x)
    torch.testing.assert_close(out, dropless(x), atol=0, rtol=0)
    assert torch.equal(capped.last_stats.kept, capped.last_stats.assigned)
    assert capped.last_stats.drop_fraction == 0.0
    torch.testing.assert_close(capped.aux_loss, dropless.aux_loss)


def test_capacity_drop_order_top1_before_top2_in_token_order():
    block = distinct_block(capacity_factor=0.5).train()  # C = ceil(24/4 * 0.5 * 2) = 6 slots per expert
    x = torch.randn(1, 24, D)
    assert block.capacity(24) == 6
    _, kept, choices = reference_moe(block, x, 6)
    block(x)
    stats = block.last_stats
    # For each expert, the kept assignments are exactly the first C in (rank, token) priority order.
    for e in range(4):
        queue = [(r, t) for r in range(2) for t in range(24) if choices[t][r] == e]
        assert sum(kept[t][r] for r, t in queue) == min(6, len(queue))
        assert [kept[t][r] for r, t in queue] == [True] * min(6, len(queue)) + [False] * max(
            0, len(queue) - 6
        )
        assert int(stats.kept[e]) == min(6, len(queue))
        assert int(stats.assigned[e]) == len(queue)
    assert 0 < stats.drop_fraction < 1


def test_token_that_loses_both_experts_outputs_zero():
    block = distinct_block(capacity_factor=0.25, min_capacity=1).train()
    x = torch.randn(1, 32, D)
    out = block(x)
    _, kept, _ = reference_moe(block, x, block.capacity(32))
    lost_both = [t for t in range(32) if not any(kept[t])]
    assert lost_both, "setup should drop some tokens entirely"
    assert torch.all(out[0, lost_both] == 0)


def test_min_capacity_and_eval_capacity():
    block = distinct_block(capacity_factor=0.1, eval_capacity_factor=2.0, min_capacity=5)
    assert block.train().capacity(8) == 5
    assert block.eval().capacity(8) == 8
    assert distinct_block(capacity_factor=1.5).eval().capacity(8) is None  # eval default: dropless


def test_top1_uses_raw_probability_like_the_reference_unless_renormalized():
    x = torch.randn(2, 5, D)
    raw = distinct_block(top_k=1)
    expected, _, _ = reference_moe(raw, x, None)
    torch.testing.assert_close(raw(x), expected, atol=1e-5, rtol=1e-5)
    renorm = distinct_block(top_k=1, renormalize=True)
    experts_out = torch.stack([e(x) for e in renorm.experts], dim=-2)  # (..., E, D)
    top1 = torch.softmax(x @ renorm.router.weight.t(), -1).argmax(-1)
    torch.testing.assert_close(
        renorm(x), experts_out.gather(-2, top1[..., None, None].expand(-1, -1, 1, D)).squeeze(-2)
    )


def test_aux_loss_is_one_for_a_uniform_router():
    block = distinct_block(num_experts=4, top_k=2)
    with torch.no_grad():
        block.router.weight.zero_()  # all probabilities 1/E
    block(torch.randn(2, 8, D))
    assert block.aux_loss.item() == pytest.approx(1.0)
    assert block.z_loss.item() == pytest.approx(math.log(4) ** 2)
    other = distinct_block(seed=1)
    assert moe_losses(nn.ModuleList([other])) == (None, None)  # no forward yet
    other(torch.randn(2, 8, D))
    aux, z = moe_losses(nn.ModuleList([block, other]))
    torch.testing.assert_close(aux, block.aux_loss + other.aux_loss)
    torch.testing.assert_close(z, block.z_loss + other.z_loss)


def test_aux_loss_formula_against_direct_computation():
    block = distinct_block(num_experts=4, top_k=2)
    x = torch.randn(2, 9, D)
    block(x)
    probs = torch.softmax(x.reshape(-1, D) @ block.router.weight.t(), -1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / probs.shape[0]
    torch.testing.assert_close(block.aux_loss, 4 * (probs.mean(0) * frac).sum())


def test_router_losses_are_computed_on_first_read_for_the_latest_forward():
    block = distinct_block(num_experts=4, top_k=2).train()
    first, second = torch.randn(1, 5, D), torch.randn(2, 7, D)
    block(first)
    assert block._latest.losses is None  # nobody has read them: not computed
    out = block(second)
    aux, z = block.aux_loss, block.z_loss
    assert block.aux_loss is aux and block.z_loss is z  # computed once, then kept
    logits = second.reshape(-1, D) @ block.router.weight.t()
    probs = torch.softmax(logits, -1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / probs.shape[0]
    torch.testing.assert_close(aux, 4 * (probs.mean(0) * frac).sum())
    torch.testing.assert_close(z, torch.logsumexp(logits, -1).square().mean())
    (out.square().mean() + aux + z).backward()  # read after the forward, still in its graph
    assert block.router.weight.grad.abs().sum() > 0


def test_a_block_after_a_training_forward_copies_and_pickles_without_its_pending_losses():
    block = distinct_block(num_experts=4, top_k=2).train()
    x = torch.randn(1, 5, D)
    block(x)  # pending losses are non-leaf tensors of this forward's graph
    clone = copy.deepcopy(block)
    restored = pickle.loads(pickle.dumps(block))
    for other in (clone, restored):
        assert other.aux_loss is None and other.last_stats is None  # a copy has run no forward yet
        for (name, a), b in zip(block.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
        other(x)
        torch.testing.assert_close(other.aux_loss, block.aux_loss)
    assert block.last_stats.num_tokens == 5  # the original keeps its own


def test_gradients_reach_router_and_every_expert_even_without_tokens():
    block = distinct_block(num_experts=4, top_k=1).train()
    with torch.no_grad():  # route every token to expert 0: experts 1..3 get no tokens
        block.router.weight.zero_()
        block.router.weight[0] = 0
        block.router.weight[0, 0] = 100.0
    x = torch.randn(1, 6, D).abs() + 0.1
    block(x)
    assert block.last_stats.top1.tolist() == [6, 0, 0, 0]
    (block(x).square().mean() + block.aux_loss).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, f"{name} is not in the autograd graph"
    assert block.router.weight.grad.abs().sum() > 0
    assert block.experts[0].fc1.weight.grad.abs().sum() > 0


def test_padding_excluded_from_routing_capacity_stats_and_aux():
    block = distinct_block(capacity_factor=1.0).train()
    x = torch.randn(2, 6, D)
    padding = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    image = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    set_routing_masks(block, padding, image)
    out = block(x)
    valid = padding.bool().reshape(-1)
    expected, _, _ = reference_moe(block, x, block.capacity(9), valid=valid)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 3:] == 0)
    stats = block.last_stats
    assert int(stats.num_tokens) == 9 and int(stats.top1.sum()) == 9 and int(stats.assigned.sum()) == 18
    assert int(stats.image_top1.sum()) == 4 and int(stats.text_top1.sum()) == 5
    probs = torch.softmax(x.reshape(-1, D)[valid] @ block.router.weight.t(), -1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 9
    torch.testing.assert_close(block.aux_loss, 4 * (probs.mean(0) * frac).sum())

    # The reference behaviour: padding routed and counted like any token.
    block.count_padding = True
    block(x)
    assert int(block.last_stats.num_tokens) == 12


def test_masks_with_another_shape_are_ignored():
    block = distinct_block()
    set_routing_masks(block, torch.zeros(2, 6), None)  # e.g. the prompt's mask during a 1-token decode step
    out = block(torch.randn(2, 1, D))
    assert int(block.last_stats.num_tokens) == 2 and out.abs().sum() > 0


def test_second_expert_noise_only_in_training_and_top1_unchanged():
    block = distinct_block(second_expert_noise=True)
    x = torch.randn(4, 16, D)
    block.eval()
    first, second = block(x), block(x)
    torch.testing.assert_close(first, second)  # deterministic at eval
    block.train()
    torch.manual_seed(1)
    noisy = block(x)
    top1_noisy = block.last_stats.top1.clone()
    block.router.second_expert_noise = False
    clean = block(x)
    assert not torch.allclose(noisy, clean)
    assert torch.equal(top1_noisy, block.last_stats.top1)


def test_experts_keep_the_dense_mlp_layout():
    mlp = GeluMLP()
    block = SparseMoeBlock.from_dense(mlp, num_experts=3, top_k=2)
    assert isinstance(block.router, nn.Linear) and block.router.bias is None
    assert block.router.weight.shape == (3, D) and block.router.weight.dtype == torch.float32
    for expert in block.experts:
        assert type(expert) is GeluMLP
        assert expert.state_dict().keys() == mlp.state_dict().keys()
        expert.load_state_dict(mlp.state_dict())


def test_bf16_block_routes_in_fp32_and_matches_dense_at_upcycling():
    torch.manual_seed(0)
    mlp = GeluMLP().to(torch.bfloat16)
    block = SparseMoeBlock.from_dense(mlp, num_experts=4, top_k=2)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16)
    out = block(x)
    assert out.dtype == torch.bfloat16 and block.router.weight.dtype == torch.float32
    torch.testing.assert_close(out, mlp(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 1, "top_k": 1}, "num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ({"min_capacity": -1}, "min_capacity"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        SparseMoeBlock.from_dense(GeluMLP(), **kwargs)


def test_bf16_autocast_keeps_the_router_in_fp32():
    block = distinct_block(capacity_factor=1.5).train()
    x = torch.randn(2, 8, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    probs = torch.softmax(x.reshape(-1, D) @ block.router.weight.t(), -1)  # fp32 reference routing
    assert torch.equal(block.last_stats.top1, torch.bincount(probs.argmax(-1), minlength=4))
    assert block.router.weight.grad is not None and block.router.weight.grad.dtype == torch.float32


def test_router_losses_disabled_skips_losses_keeps_outputs_and_stats():
    block = distinct_block()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        expected = block(x)
        stats = block.last_stats
        with router_losses_disabled(nn.ModuleList([block])):
            out = block(x)
            assert block.aux_loss is None and block.z_loss is None
            assert moe_losses(nn.ModuleList([block])) == (None, None)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(block.last_stats.top1, stats.top1)
        block(x)  # restored on exit
    assert block.compute_losses and block.aux_loss is not None


def test_router_stats_are_computed_on_first_read_and_describe_the_latest_forward():
    block = distinct_block().eval()
    first, second = torch.randn(1, 6, D), torch.randn(1, 10, D)
    block(first)
    assert block._latest.stats is None  # nothing computed until someone reads them
    block(second)
    stats = block.last_stats
    assert int(stats.num_tokens) == 10 and block.last_stats is stats  # the latest forward, cached
    with torch.no_grad():
        probs = block.router(second.view(-1, D).float()).softmax(-1)
    assert torch.equal(stats.top1, torch.bincount(probs.argmax(-1), minlength=4))
    assert stats.entropy > 0 and not stats.entropy.requires_grad


def test_inference_skips_experts_without_tokens_training_runs_them_all():
    block = distinct_block().eval()
    x = torch.randn(1, 1, D)  # one token: top-2 of 4, so two experts get nothing
    calls = []
    for i, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    with torch.no_grad():
        inferred = block(x)
    chosen = sorted(block.last_stats.assigned.nonzero().flatten().tolist())
    assert sorted(calls) == chosen and len(chosen) == 2
    calls.clear()
    with_grad = block(x)  # autograd on: every expert is in the graph (DDP without unused parameters)
    assert sorted(calls) == [0, 1, 2, 3]
    torch.testing.assert_close(inferred, with_grad.detach(), atol=0, rtol=0)


def test_router_alone_gives_the_routing_the_block_runs():
    block = distinct_block(capacity_factor=0.5).train()  # C = 6 slots per expert for 24 tokens
    x = torch.randn(24, D)
    routing = block.router.route(x)
    experts_in_order = routing.topk_idx.t().reshape(-1)[routing.order]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])  # kept assignments grouped by expert
    assert routing.kept.tolist() == [min(6, int(a)) for a in routing.assigned]
    assert int(routing.assigned.sum()) == 48 and routing.order.numel() == int(routing.kept.sum())
    assert routing.gate.shape == routing.order.shape and torch.all(routing.gate > 0)
    block(x)
    assert torch.equal(block.last_stats.kept, routing.kept) and block.last_expert_path == "loop"
    aux, z = block.router.losses(routing)
    torch.testing.assert_close((aux, z), (block.aux_loss, block.z_loss))


def test_checkpoint_layout_is_the_dense_ffn_per_expert():
    block = SparseMoeBlock.from_dense(GeluMLP(), num_experts=2, top_k=1)
    assert list(block.state_dict()) == [
        *(f"experts.{i}.{name}" for i in range(2) for name in GeluMLP().state_dict()),
        "router.weight",
    ]
