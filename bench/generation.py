"""Generation benchmark: tokens/s of KV-cached greedy ``generate``, dense against MoE.

The bench model (:mod:`bench.models`, eval mode) and its upcycled twin (evaluation capacity 2.0,
as exported by stage 3) generate a fixed number of new tokens for the same prompts (one 64x64
image and ``prompt_len`` text tokens each, equal lengths, no padding), with EOS stopping off so
that every call produces exactly ``new_tokens`` tokens per sequence. One case per batch size;
``dense`` and ``moe`` are interleaved within it. tokens/s = batch x new tokens / wall time of the
whole call (image encoding and prefill included).

Target: (MoE tokens/s) / (dense tokens/s) >= 0.9 x (dense FLOPs / MoE FLOPs) of the same call,
i.e. the MoE model may lose at most 10% against what its extra FLOPs alone would cost.

Each case also times one decode step's FFN work at the first MoE layer (``batch`` rows, caches
flushed before every call, as they are when the whole model runs between two visits): the dense
FFN, the MoE block, and the block's experts alone on pre-gathered rows (no routing or dispatch).
From it, ``bound_tokens_per_s_ratio``: the tokens/s ratio the MoE model would reach if routing
and dispatch cost nothing, T_dense_call / (T_dense_call + decode steps x MoE layers x
(T_experts_alone - T_dense_ffn)). Where that bound is below the target, the experts' own GEMMs
(small-row, weight-read bound) miss it and no dispatch code can meet it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from bench import common, flops, layers, models
from bench import device as device_lib
from bench.timing import LoadMonitor, paired_ratio, summarize
from moe_llava.model.moe import moe_blocks, router_losses_disabled

NAME = "generation"
TARGET_TEXT = "(MoE tokens/s) / (dense tokens/s) >= 0.9 x FLOPs_dense / FLOPs_moe, same generate call"


@dataclass
class GenerationBenchConfig:
    d_model: int = 512
    ffn: int = 2048
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 32  # text tokens after the image's 64 tokens (plus one leading token)
    new_tokens: int = 64
    repeats: int = 7
    warmup: int = 1
    seed: int = 0
    device: str = "auto"
    flop_slack: float = 0.9  # target: tokens/s ratio >= slack x FLOP ratio
    max_waiting_cores: float | None = 0.15
    max_rounds_factor: int = 3
    max_quiet_wait_s: float = 30.0
    ffn_step_repeats: int = 31  # rounds of the decode-step FFN timing (a few ms per call)
    cache_flush_mib: int = 64  # bytes written before each decode-step call: more than the L3 cache


FULL = GenerationBenchConfig()
QUICK = GenerationBenchConfig(
    d_model=256,
    ffn=1024,
    heads=4,
    prompt_len=8,
    new_tokens=16,
    repeats=3,
    warmup=1,
    max_rounds_factor=2,
    max_quiet_wait_s=5.0,
    ffn_step_repeats=7,
)


def config_from_options(quick: bool = False, **overrides) -> GenerationBenchConfig:
    return common.replace_config(QUICK if quick else FULL, NAME, overrides)


def _generate(model, prompt: dict, new_tokens: int) -> torch.Tensor:
    return model.generate(
        **prompt,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,  # no EOS stopping: every sequence gets exactly new_tokens tokens
        pad_token_id=0,
    )


def _decode_ffn_step(cfg, batch_size: int, dense, moe, device) -> dict:
    """Time one decode step's FFN at the first MoE layer: dense FFN, MoE block, experts alone."""
    name, block = moe_blocks(moe)[0]
    dense_ffn = dense.get_submodule(name)  # upcycling replaced exactly this module
    d_model = block.router.in_features
    weight = next(block.experts.parameters())
    generator = torch.Generator().manual_seed(cfg.seed + 100 + batch_size)
    x = torch.randn(batch_size, 1, d_model, generator=generator).to(device=device, dtype=weight.dtype)
    flush = torch.zeros(cfg.cache_flush_mib * 2**20 // 4, device=device)

    def run_dense():
        with torch.no_grad():
            dense_ffn(x)

    def run_moe():
        with torch.no_grad():
            block(x)

    variants = {
        "dense_ffn": run_dense,
        "moe_block": run_moe,
        "experts_alone": layers.experts_only_fn(block, x, None),
    }
    step_cfg = dataclasses.replace(cfg, repeats=cfg.ffn_step_repeats)
    with router_losses_disabled(moe):  # as generate runs the blocks
        timing, info = common.timed_case(
            variants, step_cfg, device, before_each=lambda _name: flush.add_(1.0)
        )
    samples = timing.samples
    steps, n_moe = cfg.new_tokens - 1, len(moe_blocks(moe))
    return {
        "layer": name,
        "rows": batch_size,
        "decode_steps": steps,
        "moe_layers": n_moe,
        "top_k": block.top_k,
        "times_ms": timing.stats_ms(),
        "experts_alone_vs_dense_ffn": paired_ratio(samples["experts_alone"], samples["dense_ffn"]),
        "moe_block_vs_dense_ffn": paired_ratio(samples["moe_block"], samples["dense_ffn"]),
        "moe_block_vs_experts_alone": paired_ratio(samples["moe_block"], samples["experts_alone"]),
        # the least extra time decoding needs in the MoE model with free routing and dispatch
        "min_extra_s_per_call": steps
        * n_moe
        * statistics.median(e - d for e, d in zip(samples["experts_alone"], samples["dense_ffn"])),
        **info,
    }


def _case(cfg, batch_size: int, dense, moe, paths_taken: set, device, log) -> tuple[dict, list[dict]]:
    case = f"batch {batch_size}"
    prompt = models.prompts(dense, batch_size, cfg.prompt_len, seed=cfg.seed + batch_size, device=device)
    prompt_len = prompt["input_ids"].shape[1]
    checks = []
    with torch.no_grad():
        abs_diff, rel = common.rel_diff(moe(**prompt).logits, dense(**prompt).logits)
        outputs = {
            "dense": _generate(dense, prompt, cfg.new_tokens),
            "moe": _generate(moe, prompt, cfg.new_tokens),
        }
    checks.append(
        common.check(
            "upcycling_identity",
            case,
            "prompt logits of the upcycled MoE model (eval capacity 2.0) vs the dense model",
            rel <= 1e-4,
            max_abs_diff=abs_diff,
            max_rel_diff=rel,
            tolerance=1e-4,
            greedy_tokens_equal_fraction=float((outputs["dense"] == outputs["moe"]).float().mean()),
        )
    )
    shapes = {name: tuple(out.shape) for name, out in outputs.items()}
    checks.append(
        common.check(
            "fixed_new_tokens",
            case,
            "every sequence of both models got exactly new_tokens tokens (EOS stopping off)",
            all(s == (batch_size, cfg.new_tokens) for s in shapes.values()),
            shapes={k: list(v) for k, v in shapes.items()},
            expected=[batch_size, cfg.new_tokens],
        )
    )
    paths_taken.clear()
    variants = {
        "dense": lambda: _generate(dense, prompt, cfg.new_tokens),
        "moe": lambda: _generate(moe, prompt, cfg.new_tokens),
    }
    timing, info = common.timed_case(variants, cfg, device)
    samples = timing.samples
    new = batch_size * cfg.new_tokens
    call_flops = {
        name: flops.generation_flops(flops.shape_of(model), batch_size, prompt_len, cfg.new_tokens)
        for name, model in (("dense", dense), ("moe", moe))
    }
    flop_ratio = call_flops["dense"]["total"] / call_flops["moe"]["total"]
    decode_bytes = {
        name: flops.decode_weight_bytes(flops.shape_of(model), batch_size)
        for name, model in (("dense", dense), ("moe", moe))
    }
    stats = timing.stats_ms()
    row = {
        "case": case,
        "batch_size": batch_size,
        "prompt_tokens": prompt_len,
        "new_tokens": cfg.new_tokens,
        "expert_path": sorted(paths_taken),
        "times_ms": stats,
        "tokens_per_s": {name: summarize([new / t for t in samples[name]]) for name in ("dense", "moe")},
        "flops_per_call": call_flops,
        "flop_ratio_dense_vs_moe": flop_ratio,
        # Memory-bound decoding: weight bytes one decode step reads (bench/flops.decode_weight_bytes).
        "decode_weight_bytes": decode_bytes,
        "decode_bytes_ratio_dense_vs_moe": decode_bytes["dense"] / decode_bytes["moe"],
        # (MoE tokens/s) / (dense tokens/s) = T_dense / T_moe, per round
        "tokens_per_s_ratio_moe_vs_dense": paired_ratio(samples["dense"], samples["moe"]),
        "gflops": {
            name: call_flops[name]["total"] / (stats[name]["median"] / 1e3) / 1e9 for name in ("dense", "moe")
        },
        **info,
    }
    step = _decode_ffn_step(cfg, batch_size, dense, moe, device)
    dense_call_s = stats["dense"]["median"] / 1e3
    row["decode_ffn_step"] = step
    row["bound_tokens_per_s_ratio"] = dense_call_s / (dense_call_s + max(step["min_extra_s_per_call"], 0.0))
    log(_progress_line(row))
    return row, checks


def _verdict(row: dict, threshold: float) -> dict:
    bound = row["bound_tokens_per_s_ratio"]
    return common.verdict(
        "moe_tokens_per_s_vs_flops",
        row["case"],
        row["tokens_per_s_ratio_moe_vs_dense"],
        ">=",
        threshold,
        TARGET_TEXT,
        note=f"FLOP ratio dense/MoE {row['flop_ratio_dense_vs_moe']:.3f}, "
        f"decode weight-bytes ratio {row['decode_bytes_ratio_dense_vs_moe']:.3f}, "
        f"with free routing {bound:.3f}" + ("" if bound >= threshold else " (unattainable)"),
        bound_tokens_per_s_ratio=bound,
    )


def run(cfg: GenerationBenchConfig, log=print) -> dict:
    start = time.perf_counter()
    device = device_lib.select_device(cfg.device)
    size = models.ModelSize(
        d_model=cfg.d_model,
        ffn=cfg.ffn,
        layers=cfg.layers,
        heads=cfg.heads,
        vocab=cfg.vocab,
        max_positions=max(2048, 1 + 64 + cfg.prompt_len + cfg.new_tokens),
    )
    dense = models.build_dense(size, seed=cfg.seed, device=device).eval()
    moe = models.upcycled_copy(dense).eval()
    paths_taken = models.record_expert_paths(moe)
    rows, checks = [], []
    with LoadMonitor() as load:
        for batch_size in cfg.batch_sizes:
            row, case_checks = _case(cfg, batch_size, dense, moe, paths_taken, device, log)
            rows.append(row)
            checks.extend(case_checks)
    verdicts = [_verdict(row, cfg.flop_slack * row["flop_ratio_dense_vs_moe"]) for row in rows]
    result = {
        "suite": NAME,
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(cfg),
        "environment": common.environment(
            device, moe_expert_path=sorted({p for r in rows for p in r["expert_path"]}), load=load.as_dict()
        ),
        "flops_formula": "bench/flops.py (module docstring); bench/README.md",
        "checks": checks,
        "results": rows,
        "targets": verdicts,
    }
    return common.finish(result, start)


def _progress_line(row: dict) -> str:
    tps = row["tokens_per_s"]
    return (
        f"[{NAME}] {row['case']:9s} dense {tps['dense']['median']:8.1f} tok/s  moe {tps['moe']['median']:8.1f} tok/s  "
        f"ratio {common.fmt(row['tokens_per_s_ratio_moe_vs_dense']['median'], '.3f')} "
        f"(FLOP ratio {row['flop_ratio_dense_vs_moe']:.3f}, free-routing bound {row['bound_tokens_per_s_ratio']:.3f})  "
        f"rounds {common.rounds_text(row)}" + ("  CONTENDED" if row["rounds"]["contended"] else "")
    )


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = common.header_lines("Generation benchmark (KV cache, greedy, dense vs MoE)", result)
    lines.append(
        f"model: Llama LM d_model={cfg['d_model']} ffn={cfg['ffn']} layers={cfg['layers']} + tiny CLIP tower; "
        f"MoE 4 experts top-2 every other layer, eval capacity 2.0; {cfg['new_tokens']} new tokens per sequence; "
        f"medians of {cfg['repeats']} interleaved rounds"
    )
    lines.append("")
    header = (
        f"{'case':9s} {'prompt':>6s} {'dense ms':>9s} {'moe ms':>9s} {'dense tok/s':>11s} {'moe tok/s':>10s} "
        f"{'moe/dense':>9s} {'FLOP ratio':>10s} {'target':>7s} {'bytes ratio':>11s} {'rounds':>7s}"
    )
    lines += [header, "-" * len(header)]
    for row in result["results"]:
        t, tps = row["times_ms"], row["tokens_per_s"]
        lines.append(
            f"{row['case']:9s} {row['prompt_tokens']:6d} {t['dense']['median']:9.1f} {t['moe']['median']:9.1f} "
            f"{tps['dense']['median']:11.1f} {tps['moe']['median']:10.1f} "
            f"{common.fmt(row['tokens_per_s_ratio_moe_vs_dense']['median'], '.3f'):>9s} "
            f"{row['flop_ratio_dense_vs_moe']:10.3f} {cfg['flop_slack'] * row['flop_ratio_dense_vs_moe']:7.3f} "
            f"{row['decode_bytes_ratio_dense_vs_moe']:11.3f} {common.rounds_text(row):>7s}"
        )
    lines.append("")
    lines.append(
        "'moe/dense': MoE tokens/s over dense tokens/s (paired per round); 'FLOP ratio': dense FLOPs /"
    )
    lines.append("MoE FLOPs of the same call (bench/flops.py); 'target': the ratio the MoE model must reach;")
    lines.append(
        "'bytes ratio': LM weight bytes a decode step reads, dense / MoE (all experts a step's tokens touch):"
    )
    lines.append("where decoding is memory-bound, tokens/s follows this rather than the FLOP ratio.")
    lines += ["", "one decode step's FFN at the first MoE layer (caches flushed before each call), medians:"]
    for row in result["results"]:
        step = row["decode_ffn_step"]
        t = step["times_ms"]
        lines.append(
            f"  {row['case']:9s} dense FFN {t['dense_ffn']['median']:7.3f} ms  MoE block {t['moe_block']['median']:7.3f} ms  "
            f"experts alone {t['experts_alone']['median']:7.3f} ms  experts/dense "
            f"{step['experts_alone_vs_dense_ffn']['median']:.2f}x (FLOPs {step['top_k']}x)  "
            f"block/experts {step['moe_block_vs_experts_alone']['median']:.3f}  "
            f"tokens/s ratio with free routing <= {row['bound_tokens_per_s_ratio']:.3f}"
        )
    lines += ["", *common.checks_lines(result["checks"]), "", *common.verdict_lines(result["targets"])]
    return "\n".join(lines)
