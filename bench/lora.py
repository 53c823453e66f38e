"""LoRA MoE-tuning against full stage 3: what it trains, what it holds in memory, what it costs, what it scores.

    python -m bench.lora [--meta-only] [--recipe phi2_clip336] [--gpus 2]
                         [--prep-override KEY=VALUE ...] [--stage3-override KEY=VALUE ...] [--no-eval]

Two parts:

* ``meta``: a real recipe (Phi-2 x4 by default) built on the meta device (no weights, no
  download), upcycled with ``conf/moe/paper.yaml``: stage 3's trainable parameters in full
  (``stage.trainable=[projector, ffn]``) and with ``lora=experts``, and the bytes per GPU of what
  AdamW trains with: fp32 gradients (4 B per trainable parameter) and its two fp32 moments (8 B),
  under DDP (every GPU holds all) and ZeRO-2 over ``--gpus`` (sharded). The model's own weights are
  the same both ways (plus the adapters) and are not counted.
* ``embedded``: the embedded default (``experiment=tiny_cpu``): backbones, stage 1 and stage 2
  once (``--prep-override`` shortens them), then stage 3 from that one stage-2 export twice,
  ``lora=none`` and ``lora=experts``, each in its own process (peak memory is per process: max RSS
  on CPU, ``torch.cuda.max_memory_allocated`` on a GPU), then each export's evaluation (POPE mean
  F1). Step time: median wall time of a whole optimizer step (all its micro-batches), after the first.

Writes ``bench_results/lora.json``. On a machine shared with other jobs run it with
``OMP_NUM_THREADS=1``: torch's two OpenMP threads on contended cores spin, and small matmuls then
run many times slower than on one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from bench import common
from moe_llava.config import compose_config
from moe_llava.paths import REPO_ROOT

SUITE = "lora"
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
GRAD_BYTES = 4  # fp32 gradients (bf16-mixed keeps fp32 parameters)


def meta_footprint(recipe: str, gpus: int) -> dict:
    """Stage 3 of ``recipe`` on the meta device: trainable parameters and AdamW bytes, full vs LoRA."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moe_llava.model.lora import LoraSettings, apply_lora, trainable_counts
    from moe_llava.model.recipes import load_recipe
    from moe_llava.paths import CONF_DIR
    from moe_llava.training.stages import configure_trainable, split_moe_settings

    model = instantiate(load_recipe(recipe), pretrained=False, device="meta")
    moe, _ = split_moe_settings(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "moe" / "paper.yaml")))
    model.upcycle(**moe)
    trainable = set(configure_trainable(model, ["projector", "ffn"]))
    lora_model = copy.deepcopy(model)
    full = trainable_counts(model)
    apply_lora(
        lora_model, LoraSettings.from_config(OmegaConf.load(CONF_DIR / "lora" / "experts.yaml")), trainable
    )
    lora = trainable_counts(lora_model)
    out = {"recipe": recipe, "gpus_for_zero2": gpus}
    for name, counts in (("full", full), ("lora", lora)):
        n = counts["total"]
        out[name] = {
            "trainable": n,
            "parts": {k: v for k, v in counts.items() if k not in ("total", "frozen")},
            "adam_state_bytes_per_gpu_ddp": n * ADAM_STATE_BYTES,
            "grad_bytes_per_gpu_ddp": n * GRAD_BYTES,
            "adam_state_bytes_per_gpu_zero2": n * ADAM_STATE_BYTES // gpus,
        }
    return out


class StepTimer(L.Callback):
    """Wall time of each optimizer step: from its first micro-batch's start to its last one's end."""

    def __init__(self):
        self.steps: list[float] = []
        self._start: float | None = None
        self._step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step != trainer.global_step:
            self._start, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step and self._start is not None:  # the step just finished
            self.steps.append(time.perf_counter() - self._start)
            self._start = None


def child_stage3(overrides: list[str], out_file: Path) -> None:
    """Run stage 3 in this process; write its numbers (peak memory of this process only)."""
    from moe_llava.training.run import run_stage

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    result = run_stage(compose_config([*overrides, "stage=stage3"], resolve=False), callbacks=[timer])
    steps = timer.steps[1:] or timer.steps
    numbers = {
        "trainable": int(result["trainable_parameters"]),
        "global_step": int(result["global_step"]),
        "train_loss": result.get("train/loss"),
        "step_s_median": statistics.median(steps) if steps else None,
        "fit_s": sum(timer.steps),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    out_file.write_text(json.dumps(numbers, indent=2))


def embedded(prep_overrides: list[str], stage3_overrides: list[str], evaluate: bool) -> dict:
    from moe_llava.data.shapesworld import generate_shapesworld
    from moe_llava.pretrain import run_backbones
    from moe_llava.training.run import run_stage

    run_root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    data_root = REPO_ROOT / "data" / "shapesworld"
    if not (data_root / "instruct_train.json").is_file():
        from hydra.utils import instantiate

        data_root = run_root / "shapesworld"  # the data.dvc data: the data group's generator settings
        generate_shapesworld(data_root, instantiate(compose_config(["experiment=tiny_cpu"]).data.generator))
    base = [
        "experiment=tiny_cpu",
        f"data.root={data_root}",
        f"run_dir={run_root / 'base'}",
        f"logger.tracking_uri=sqlite:///{run_root / 'mlflow.db'}",
        f"logger.artifact_location={run_root / 'mlartifacts'}",
        "trainer.enable_progress_bar=false",
        "logger.log_system_metrics=false",
    ]
    prep = {}
    for stage in ("backbones", "stage1", "stage2"):
        start = time.perf_counter()
        cfg = compose_config(
            [*base, *prep_overrides, f"stage={'stage1' if stage == 'backbones' else stage}"], resolve=False
        )
        run_backbones(cfg) if stage == "backbones" else run_stage(cfg)
        prep[stage] = time.perf_counter() - start
        print(f"[lora] {stage}: {prep[stage]:.0f} s", file=sys.stderr)
    stage2 = run_root / "base" / "stage2" / "export"
    variants = {}
    for name, lora in (("full", "lora=none"), ("lora", "lora=experts")):
        run_dir = run_root / name
        overrides = [*base, f"run_dir={run_dir}", f"init_from={stage2}", lora, *stage3_overrides]
        out_file = run_root / f"{name}.json"
        cmd = [sys.executable, "-m", "bench.lora", "--child", str(out_file), "--child-overrides", *overrides]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=sys.stderr)
        variants[name] = json.loads(out_file.read_text())
        if evaluate:
            eval_cmd = [
                sys.executable,
                "-m",
                "moe_llava.evaluate",
                *overrides,
                "stage=stage3",
                "evaluation.progress=false",
            ]
            subprocess.run(eval_cmd, check=True, cwd=REPO_ROOT, stdout=sys.stderr)
            metrics = json.loads((run_dir / "stage3" / "eval" / "metrics.json").read_text())
            variants[name]["pope_mean_f1"] = metrics.get("pope/mean_f1")
        print(f"[lora] stage3 {name}: {variants[name]}", file=sys.stderr)
    shutil.rmtree(run_root, ignore_errors=True)
    return {
        "prep_seconds": prep,
        "prep_overrides": prep_overrides,
        "stage3_overrides": stage3_overrides,
        **variants,
    }


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meta-only", action="store_true", help="only the meta-device footprint")
    parser.add_argument("--recipe", default="phi2_clip336")
    parser.add_argument("--gpus", type=int, default=2, help="ZeRO-2 shards over this many GPUs")
    parser.add_argument(
        "--prep-override", nargs="*", default=[], help="Hydra overrides for backbones, stage 1, 2"
    )
    parser.add_argument(
        "--stage3-override", nargs="*", default=[], help="Hydra overrides for both stage-3 runs"
    )
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench_results/lora.json)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_stage3(args.child_overrides, args.child)
        return
    results = {"meta": meta_footprint(args.recipe, args.gpus)}
    meta = results["meta"]
    print(f"{args.recipe} stage 3 (meta device): trainable | AdamW state per GPU, DDP | ZeRO-2 x{args.gpus}")
    for name in ("full", "lora"):
        row = meta[name]
        print(
            f"  {name:<5} {row['trainable'] / 1e6:10.1f} M | {_gib(row['adam_state_bytes_per_gpu_ddp']):>10} | "
            f"{_gib(row['adam_state_bytes_per_gpu_zero2']):>10}"
        )
    if not args.meta_only:
        results["embedded"] = embedded(args.prep_override, args.stage3_override, not args.no_eval)
        emb = results["embedded"]
        print("embedded default, stage 3: trainable | peak memory | step time | POPE mean F1")
        for name in ("full", "lora"):
            row = emb[name]
            peak = row["peak_cuda_bytes"] if row["peak_cuda_bytes"] is not None else row["peak_rss_bytes"]
            print(
                f"  {name:<5} {row['trainable']:>10,} | {_gib(peak):>10} | {row['step_s_median'] or 0:6.2f} s | "
                f"{row.get('pope_mean_f1')}"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"wrote {common.write_result(SUITE, {'environment': common.environment(device), **results}, args.out)}"
    )


if __name__ == "__main__":
    main()
