"""Training-step benchmark: stage 2 (dense) against stage 3 (MoE, upcycled from the same weights).

One case per dtype. In each interleaved round (see :mod:`bench.timing`) three calls are timed:

=================  ===========================================================================
variant            what runs
=================  ===========================================================================
``dense``          one stage-2 training step of the dense bench model (:mod:`bench.models`):
                   forward, backward, clipping, AdamW step, zero_grad; stage 2's trainable set
``moe``            the same for its upcycled twin (4 experts, top-2, every other layer,
                   capacity 1.5), stage 3's trainable set (projector + FFNs/experts + routers)
``gemm_ceiling``   plain ``torch.mm`` calls of one FFN's forward and backward GEMMs on the batch's
                   B x T rows (:func:`bench.layers.gemm_ceiling_fn`): this machine's GEMM rate
=================  ===========================================================================

Both models see the same batch (synthetic: one 64x64 image and random text per sample, loss on
the second half). Reported: tokens/s of each step, the time ratio MoE/dense (paired per round)
next to the analytic FLOP ratio (:mod:`bench.flops`), and the model FLOP utilisation: achieved
FLOP/s of a step over the GEMM ceiling's FLOP/s (paired per round).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from bench import common, flops, layers, models
from bench import device as device_lib
from bench.timing import LoadMonitor, paired_ratio, summarize

NAME = "training"

TARGETS = {
    "moe_time_vs_flops": "T_moe / T_dense <= 1.1 x (FLOPs_moe / FLOPs_dense), one training step, same batch",
    "mfu": "model FLOP utilisation (step FLOP/s over this machine's dense-GEMM FLOP/s) >= 40% on CPU",
}


@dataclass
class TrainingBenchConfig:
    d_model: int = 512
    ffn: int = 2048
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    batch_size: int = 8
    seq_len: int = 256  # tokens per sample, the 64 image tokens included
    dtypes: tuple[str, ...] = ("float32",)  # float32: precision 32-true; bfloat16: bf16-mixed autocast
    repeats: int = 7
    warmup: int = 2
    seed: int = 0
    device: str = "auto"
    time_ratio_slack: float = 1.1  # target: time ratio <= slack x FLOP ratio
    mfu_target: float = 0.40
    # Contention control, as in the layer suite (bench.timing.time_interleaved).
    max_waiting_cores: float | None = 0.15
    max_rounds_factor: int = 3
    max_quiet_wait_s: float = 30.0


FULL = TrainingBenchConfig()
QUICK = TrainingBenchConfig(
    d_model=256,
    ffn=1024,
    heads=4,
    batch_size=2,
    seq_len=128,
    repeats=3,
    warmup=1,
    max_rounds_factor=2,
    max_quiet_wait_s=5.0,
)


def config_from_options(quick: bool = False, **overrides) -> TrainingBenchConfig:
    cfg = common.replace_config(QUICK if quick else FULL, NAME, overrides)
    for name in cfg.dtypes:
        if name not in models.DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(models.DTYPES)}")
    return cfg


def _size(cfg: TrainingBenchConfig) -> models.ModelSize:
    return models.ModelSize(
        d_model=cfg.d_model,
        ffn=cfg.ffn,
        layers=cfg.layers,
        heads=cfg.heads,
        vocab=cfg.vocab,
        max_positions=max(2048, cfg.seq_len),
    )


def _drop_fraction(model) -> float | None:
    stats = [s for s in model.router_stats().values() if s is not None]
    if not stats:
        return None
    assigned = sum(float(s.assigned.sum()) for s in stats)
    kept = sum(float(s.kept.sum()) for s in stats)
    return 0.0 if assigned == 0 else 1.0 - kept / assigned


def _case(cfg: TrainingBenchConfig, dtype_name: str, device: torch.device, log) -> tuple[dict, list[dict]]:
    case = f"{dtype_name}/{cfg.batch_size}x{cfg.seq_len}"
    checks: list[dict] = []
    dense = models.build_dense(_size(cfg), seed=cfg.seed, device=device)
    moe = models.upcycled_copy(dense)
    batch = models.synthetic_batch(dense, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1, device=device)

    # Upcycling identity: before any step the MoE model computes the dense model's logits.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    with torch.no_grad(), models.dropless(moe):
        abs_diff, rel = common.rel_diff(moe.eval()(**inputs).logits, dense.eval()(**inputs).logits)
    checks.append(
        common.check(
            "upcycling_identity",
            case,
            "logits of the upcycled MoE model (dropless) vs the dense model, same batch, before training",
            rel <= 1e-4,
            max_abs_diff=abs_diff,
            max_rel_diff=rel,
            tolerance=1e-4,
        )
    )
    stage2, stage3 = models.stage_settings("stage2"), models.stage_settings("stage3")
    dense_step = models.TrainStep.for_stage(dense.train(), stage2, precision=dtype_name)
    moe_step = models.TrainStep.for_stage(moe.train(), stage3, precision=dtype_name)
    dense_shape, moe_shape = flops.shape_of(dense), flops.shape_of(moe)
    sparse = tuple(range(0, dense_shape.layers, 2))
    checks.append(
        common.check(
            "moe_layer_placement",
            case,
            "MoE layers of the stage-3 model vs the paper's `sparse` placement (every other layer from 0)",
            moe_shape.moe_layers == sparse and moe_shape.top_k == 2 and moe_shape.num_experts == 4,
            moe_layers=list(moe_shape.moe_layers),
            expected=list(sparse),
            num_experts=moe_shape.num_experts,
            top_k=moe_shape.top_k,
        )
    )
    snapshots = {"dense": models.trainable_snapshot(dense), "moe": models.trainable_snapshot(moe)}
    paths_taken = models.record_expert_paths(moe)

    dtype = models.DTYPES[dtype_name]
    activation = "swiglu" if dense_shape.ffn_matrices == 3 else "gelu"
    rows = cfg.batch_size * cfg.seq_len
    gemm = layers.gemm_ceiling_fn(activation, rows, cfg.d_model, cfg.ffn, dtype, device, backward=True)
    gemm_flops = 3 * rows * layers.ffn_matmul_flops_per_token(activation, cfg.d_model, cfg.ffn)
    variants = {
        "dense": lambda: dense_step(batch),
        "moe": lambda: moe_step(batch),
        "gemm_ceiling": gemm,
    }
    timing, info = common.timed_case(variants, cfg, device)
    samples = timing.samples

    for name, step in (("dense", dense_step), ("moe", moe_step)):
        loss = float(step.last_loss)
        ok, detail = models.changed_as_expected(step.model, snapshots[name])
        checks.append(
            common.check(
                f"trainable_set_{name}",
                case,
                f"after the timed steps: the {name} model's trainable parameters moved, frozen ones did not "
                f"(stage {'2' if name == 'dense' else '3'} groups {(stage2 if name == 'dense' else stage3)['trainable']}), "
                "and the loss is finite",
                ok and math.isfinite(loss),
                loss=loss,
                parameters=detail,
            )
        )

    seq_lengths = [cfg.seq_len] * cfg.batch_size
    step_flops = {
        "dense": flops.training_flops(dense_shape, seq_lengths, images=cfg.batch_size),
        "moe": flops.training_flops(moe_shape, seq_lengths, images=cfg.batch_size),
    }
    flop_ratio = step_flops["moe"]["total"] / step_flops["dense"]["total"]
    stats = timing.stats_ms()
    time_ratio = paired_ratio(samples["moe"], samples["dense"])
    row: dict = {
        "case": case,
        "dtype": dtype_name,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "tokens_per_step": rows,
        "expert_path": sorted(paths_taken),
        "moe_layers": list(moe_shape.moe_layers),
        "times_ms": stats,
        "tokens_per_s": {name: summarize([rows / t for t in samples[name]]) for name in ("dense", "moe")},
        "flops_per_step": step_flops,
        "flop_ratio_moe_vs_dense": flop_ratio,
        "time_ratio_moe_vs_dense": time_ratio,
        "time_ratio_over_flop_ratio": None
        if time_ratio["median"] is None
        else time_ratio["median"] / flop_ratio,
        "gflops": {
            name: step_flops[name]["total"] / (stats[name]["median"] / 1e3) / 1e9 for name in ("dense", "moe")
        },
        "gemm_ceiling_gflops": gemm_flops / (stats["gemm_ceiling"]["median"] / 1e3) / 1e9,
        "mfu": {
            name: paired_ratio(
                samples["gemm_ceiling"], samples[name], factor=gemm_flops / step_flops[name]["total"]
            )
            for name in ("dense", "moe")
        },
        "trainable_parameters": {
            "dense": sum(p.numel() for p in dense_step.params),
            "moe": sum(p.numel() for p in moe_step.params),
        },
        "moe_drop_fraction": _drop_fraction(moe),
        "loss": {"dense": float(dense_step.last_loss), "moe": float(moe_step.last_loss)},
        **info,
    }
    log(_progress_line(row))
    return row, checks


def _is_bench_size(cfg: TrainingBenchConfig) -> bool:
    keys = ("d_model", "ffn", "layers", "heads", "vocab", "batch_size", "seq_len")
    return all(getattr(cfg, k) == getattr(FULL, k) for k in keys)


def evaluate_targets(rows: list[dict], cfg: TrainingBenchConfig, device: torch.device) -> list[dict]:
    verdicts = []
    for row in rows:
        threshold = cfg.time_ratio_slack * row["flop_ratio_moe_vs_dense"]
        verdicts.append(
            common.verdict(
                "moe_time_vs_flops",
                row["case"],
                row["time_ratio_moe_vs_dense"],
                "<=",
                threshold,
                TARGETS["moe_time_vs_flops"],
                note=f"FLOP ratio {row['flop_ratio_moe_vs_dense']:.3f}",
            )
        )
        for name in ("dense", "moe"):
            target = f"mfu_{name}"
            if device.type != "cpu":
                verdicts.append(
                    common.not_applicable(target, row["case"], TARGETS["mfu"], "the MFU target is for CPU")
                )
                continue
            verdicts.append(
                common.verdict(
                    target,
                    row["case"],
                    row["mfu"][name],
                    ">=",
                    cfg.mfu_target,
                    TARGETS["mfu"],
                    note=None if _is_bench_size(cfg) else "not the bench size: indicative only",
                )
            )
    return verdicts


def run(cfg: TrainingBenchConfig, log=print) -> dict:
    start = time.perf_counter()
    device = device_lib.select_device(cfg.device)
    rows, checks = [], []
    with LoadMonitor() as load:
        for dtype_name in cfg.dtypes:
            row, case_checks = _case(cfg, dtype_name, device, log)
            rows.append(row)
            checks.extend(case_checks)
    paths = sorted({p for row in rows for p in row["expert_path"]})
    result = {
        "suite": NAME,
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(cfg),
        "environment": common.environment(device, moe_expert_path=paths, load=load.as_dict()),
        "flops_formula": "bench/flops.py (module docstring); bench/README.md",
        "checks": checks,
        "results": rows,
        "targets": evaluate_targets(rows, cfg, device),
    }
    return common.finish(result, start)


def _progress_line(row: dict) -> str:
    t = row["times_ms"]
    ratio = row["time_ratio_moe_vs_dense"]["median"]
    return (
        f"[{NAME}] {row['case']:18s} dense {t['dense']['median']:8.1f} ms  moe {t['moe']['median']:8.1f} ms  "
        f"time ratio {common.fmt(ratio, '.3f')} vs FLOP ratio {row['flop_ratio_moe_vs_dense']:.3f}  "
        f"MFU dense {common.fmt(row['mfu']['dense']['median'], '.0%')}  rounds {common.rounds_text(row)}"
        + ("  CONTENDED" if row["rounds"]["contended"] else "")
    )


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = common.header_lines("Training-step benchmark (stage 2 dense vs stage 3 MoE)", result)
    lines.append(
        f"model: Llama LM d_model={cfg['d_model']} ffn={cfg['ffn']} layers={cfg['layers']} heads={cfg['heads']} "
        f"vocab={cfg['vocab']} + tiny CLIP tower; MoE: 4 experts, top-2, layers "
        f"{result['results'][0]['moe_layers'] if result['results'] else '?'}; medians of {cfg['repeats']} interleaved rounds"
    )
    lines.append("")
    header = (
        f"{'case':18s} {'dense ms':>9s} {'moe ms':>9s} {'dense tok/s':>11s} {'moe tok/s':>10s} "
        f"{'time ratio':>10s} {'FLOP ratio':>10s} {'time/FLOP':>9s} {'MFU dense':>9s} {'MFU moe':>8s} "
        f"{'GEMM GFLOP/s':>12s} {'drop':>6s} {'rounds':>7s}"
    )
    lines += [header, "-" * len(header)]
    for row in result["results"]:
        t = row["times_ms"]
        lines.append(
            f"{row['case']:18s} {t['dense']['median']:9.1f} {t['moe']['median']:9.1f} "
            f"{row['tokens_per_s']['dense']['median']:11.0f} {row['tokens_per_s']['moe']['median']:10.0f} "
            f"{common.fmt(row['time_ratio_moe_vs_dense']['median'], '.3f'):>10s} "
            f"{row['flop_ratio_moe_vs_dense']:10.3f} {common.fmt(row['time_ratio_over_flop_ratio'], '.3f'):>9s} "
            f"{common.fmt(row['mfu']['dense']['median'], '.1%'):>9s} {common.fmt(row['mfu']['moe']['median'], '.1%'):>8s} "
            f"{row['gemm_ceiling_gflops']:12.1f} {common.fmt(row['moe_drop_fraction'], '.1%'):>6s} "
            f"{common.rounds_text(row):>7s}"
        )
    lines += ["", "analytic GFLOP per step (forward + backward; bench/flops.py):"]
    for row in result["results"]:
        dense, moe = row["flops_per_step"]["dense"], row["flops_per_step"]["moe"]
        names = list(dict.fromkeys([*dense["by_term"], *moe["by_term"]]))
        parts = "  ".join(
            f"{n} {dense['by_term'].get(n, 0) / 1e9:.2f}/{moe['by_term'].get(n, 0) / 1e9:.2f}" for n in names
        )
        lines.append(
            f"  {row['case']}: dense {dense['total'] / 1e9:.2f}, MoE {moe['total'] / 1e9:.2f} "
            f"(per term dense/MoE: {parts})"
        )
    lines += ["", *common.checks_lines(result["checks"]), "", *common.verdict_lines(result["targets"])]
    return "\n".join(lines)
