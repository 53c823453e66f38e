"""The benchmark's own machinery: interleaving, paired ratios, memory tracking, baselines, verdicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import layers, memory, moe_layer, timing
from moe_llava.model.moe import SparseMoeBlock


def test_interleaved_rounds_rotate_the_order_and_skip_warmup():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = timing.time_interleaved(variants, repeats=3, warmup=1)
    assert calls == list("abc") + list("bca") + list("cab") + list("abc")
    assert {name: len(v) for name, v in result.samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_loaded_rounds_are_set_aside_and_rerun(monkeypatch):
    loads = iter([0.0, 0.9, 0.0, 0.8, 0.0, 0.5])  # warmup, then timed rounds

    class FakeMonitor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.contention = next(loads)

    monkeypatch.setattr(timing, "LoadMonitor", FakeMonitor)
    waits = []
    monkeypatch.setattr(timing, "wait_for_quiet", lambda load, budget: waits.append(budget) or 1.0)
    calls = []
    result = timing.time_interleaved({"a": lambda: calls.append(1)}, repeats=2, warmup=1, max_other_load=0.1)
    assert result.rounds_run == 4 and result.rounds_set_aside == 2 and not result.contended
    assert result.round_loads == [0.0, 0.0] and len(result.samples["a"]) == 2 and len(calls) == 5
    assert waits == [30.0, 29.0] and result.quiet_wait_s == 2.0  # after each loaded round, within budget

    # Never quiet enough: after max_rounds the least loaded rounds are kept, flagged.
    loads = iter([0.0, 0.9, 0.3, 0.8, 0.2])
    result = timing.time_interleaved(
        {"a": lambda: None}, repeats=2, warmup=1, max_other_load=0.1, max_rounds=4
    )
    assert result.contended and result.rounds_run == 4 and result.round_loads == [0.3, 0.2]


def test_summaries_and_paired_ratios():
    assert timing.summarize([3.0, 1.0, 2.0], scale=10) == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    assert timing.summarize([])["median"] is None
    ratio = timing.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0], factor=2)
    assert ratio["median"] == 1.0 and ratio["max"] == 1.5


def test_memory_tracker_counts_new_tensors_not_inputs_or_views():
    x = torch.randn(256, 256)  # 256 KiB, exists before: not counted

    def work():
        y = x * 2  # 256 KiB
        z = y.t()  # view: nothing new
        w = z + 1  # 256 KiB, y still alive
        del y, z, w
        x.view(-1)

    with memory.TensorMemoryTracker() as tracker:
        work()
    assert tracker.peak == 2 * 256 * 256 * 4
    assert tracker.current == 0
    assert memory.peak_memory_bytes(work, torch.device("cpu")) == 2 * 256 * 256 * 4


def _block(capacity_factor=None, seed=0):
    torch.manual_seed(seed)
    dense = layers.make_dense_ffn("swiglu", 32, 64)
    block = SparseMoeBlock.from_dense(dense, 4, 2, capacity_factor=capacity_factor)
    layers.perturb_experts(block, scale=0.3, seed=seed + 1)
    return block


def test_einsum_baseline_equals_sparse_block_at_the_same_capacity_drops_included():
    block = _block(capacity_factor=0.75).train()  # C = 24 of 32 assignments per expert on average
    baseline = layers.EinsumTop2Moe(block, capacity_factor=0.75)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        ours, theirs = block(x), baseline(x)
        _, dispatch, capacity = baseline.gating(x.reshape(-1, 32))
    assert capacity == block.capacity(64) == 24
    assert int(dispatch.sum()) == int(block.last_stats.kept.sum()) < 128  # something was dropped
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_mixtral_copy_computes_the_same_block():
    block = _block().eval()
    x = torch.randn(1, 48, 32)
    for impl in layers.MIXTRAL_IMPLEMENTATIONS:
        mixtral = layers.mixtral_from_block(block, impl).eval()
        with torch.no_grad():
            torch.testing.assert_close(mixtral(x), block(x), atol=1e-5, rtol=1e-5)


def test_experts_only_and_gemm_ceiling_run():
    block = _block()
    x, grad = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    layers.experts_only_fn(block, x, grad)()
    assert all(p.grad is not None for p in block.experts.parameters())
    layers.gemm_ceiling_fn("gelu", 32, 32, 64, torch.float32, torch.device("cpu"), backward=True)()
    assert layers.ffn_matmul_flops_per_token("swiglu", 32, 64) == 2 * 3 * 32 * 64


def test_expert_gemm_floor_runs_the_experts_gemms_only(monkeypatch):
    block = _block()
    x, grad = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(
        torch, "mm", lambda a, b: calls.append((tuple(a.shape), tuple(b.shape))) or real_mm(a, b)
    )
    layers.expert_gemm_floor_fn(block, x, None)()
    forward_calls = list(calls)
    calls.clear()
    layers.expert_gemm_floor_fn(block, x, grad)()
    monkeypatch.undo()
    index, _ = layers.reference_routing(block, x)
    counts = torch.bincount(index.reshape(-1), minlength=block.num_experts).tolist()
    ffn = block.experts[0].down_proj.in_features
    # forward: per expert one fused (gate; up) GEMM and the down projection, on its routed rows
    assert forward_calls == [
        shape for n in counts for shape in (((n, 32), (32, 2 * ffn)), ((n, ffn), (ffn, 32)))
    ]
    assert len(calls) == 6 * block.num_experts  # + input and weight gradients of both GEMMs
    assert all(p.grad is None for p in block.parameters())  # nothing of the block itself runs

    class Custom(torch.nn.Module):  # no recognised layout: no floor
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(32, 32)

        def forward(self, h):
            return self.inner(h)

    assert layers.expert_gemm_floor_fn(SparseMoeBlock.from_dense(Custom(), num_experts=2), x, None) is None


def test_eager_moe_floor_computes_the_block_output_from_precomputed_routing(monkeypatch):
    block = _block().eval()
    x = torch.randn(1, 16, 32)
    assert layers.eager_moe_floor_fn(block, x, torch.randn(1, 16, 32)) is None  # forward only
    linears, silus = [], []
    real_linear, real_silu = F.linear, F.silu
    monkeypatch.setattr(
        F, "linear", lambda a, w, b=None: linears.append((a.shape[0], tuple(w.shape))) or real_linear(a, w, b)
    )
    monkeypatch.setattr(F, "silu", lambda a, inplace=False: silus.append(inplace) or real_silu(a, inplace))
    run = layers.eager_moe_floor_fn(block, x, None)
    routing_calls = len(linears)  # the router, outside the timed call
    linears.clear()
    out = run()
    monkeypatch.undo()
    assert routing_calls == 1
    with torch.no_grad():
        torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    index, _ = layers.reference_routing(block, x)
    counts = torch.bincount(index.reshape(-1), minlength=block.num_experts).tolist()
    ffn = block.experts[0].down_proj.in_features
    # per expert, on its routed rows: gate, up, down with the expert's own weights; SiLU in place
    assert linears == [shape for n in counts for shape in ((n, (ffn, 32)), (n, (ffn, 32)), (n, (32, ffn)))]
    assert silus == [True] * block.num_experts
    assert all(p.grad is None for p in block.parameters())

    # An activation without an in-place form (Phi's gelu_new, biases) runs as the module itself.
    gelu_block = SparseMoeBlock.from_dense(layers.make_dense_ffn("gelu", 32, 64), num_experts=4).eval()
    layers.perturb_experts(gelu_block, scale=0.3)
    with torch.no_grad():
        torch.testing.assert_close(layers.eager_moe_floor_fn(gelu_block, x, None)(), gelu_block(x))


def test_target_verdicts_margin_and_applicability():
    def row(tokens, mode, dtype, ratio, mixtral):
        stats = lambda v: {"median": v, "min": v, "max": v, "n": 1}  # noqa: E731
        return {
            "activation": "swiglu",
            "dtype": dtype,
            "tokens": tokens,
            "mode": mode,
            "ratio_moe_vs_k_dense": stats(ratio),
            "speedup_vs_mixtral_fastest": stats(mixtral),
            "ceiling_speedup_vs_mixtral": stats(mixtral * 1.05),
            **({"eager_ceiling_speedup_vs_mixtral": stats(mixtral * 1.02)} if mode == "fwd" else {}),
        }

    verdicts = moe_layer.evaluate_targets(
        [
            row(512, "fwd_bwd", "float32", 1.3, 1.2),
            row(2048, "fwd_bwd", "bfloat16", 1.2, 1.0),
            row(2048, "fwd", "bfloat16", 1.2, 1.07),
        ]
    )
    by_case = {(v["target"], v["case"]): v for v in verdicts}
    dense_bf16 = by_case[("moe_vs_k_dense", "swiglu/bfloat16/S=2048/fwd_bwd")]
    assert dense_bf16["met"] is False and dense_bf16["threshold"] == 1.15
    assert abs(dense_bf16["margin"] - (1.15 / 1.2 - 1)) < 1e-12
    assert ("moe_vs_k_dense", "swiglu/float32/S=512/fwd_bwd") not in by_case  # only from 2048 tokens
    assert by_case[("speedup_vs_mixtral", "swiglu/float32/S=512/fwd_bwd")]["met"] is True
    assert by_case[("speedup_vs_mixtral", "swiglu/bfloat16/S=2048/fwd_bwd")]["met"] is False
    # the GEMMs-alone ceiling says whether the target is attainable at all
    assert by_case[("speedup_vs_mixtral", "swiglu/float32/S=512/fwd_bwd")]["ceiling_met"] is True
    unattainable = by_case[("speedup_vs_mixtral", "swiglu/bfloat16/S=2048/fwd_bwd")]
    assert unattainable["ceiling"] == 1.05 and unattainable["ceiling_met"] is False
    assert "ceiling" not in dense_bf16
    # forward cases also carry the eager floor: here the GEMMs leave room, eager kernels do not
    eager = by_case[("speedup_vs_mixtral", "swiglu/bfloat16/S=2048/fwd")]
    assert eager["met"] is False and eager["ceiling_met"] is True
    assert abs(eager["eager_ceiling"] - 1.07 * 1.02) < 1e-12 and eager["eager_ceiling_met"] is False
    assert "eager_ceiling" not in unattainable
    assert all(v["target"] != "speedup_vs_deepspeed_einsum" for v in verdicts)
