"""End to end: wall time of each step of the tiny_cpu pipeline, as a user runs it.

    python -m bench.e2e [--quick] [--max-steps N] [--no-eval] [--override KEY=VALUE ...]

Runs the backbone pretraining step and stages 1-3 in-process on the real Hydra config composed
with ``experiment=tiny_cpu`` (what the flow and ``python -m moe_llava.train`` run), with the run
folder and the MLflow database in a temporary folder, then the evaluation
(``python -m moe_llava.evaluate ... stage=stage3``) in a subprocess. A stage's time is the whole
call: model load (and upcycling in stage 3), data preparation, ``Trainer.fit``, export, MLflow
logging; ``fit_s`` is its part from the first training batch to the last.

Data: ``data/shapesworld`` when present, else (and always with ``--quick``) a small ShapesWorld
generated into the temporary folder before the clock starts. ``--quick``: 2 steps per stage,
no progress bar or system metrics, 8 evaluation questions per file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from bench import common
from moe_llava.config import compose_config
from moe_llava.paths import REPO_ROOT

SUITE = "e2e"
STAGES = ("backbones", "stage1", "stage2", "stage3")
SMALL_WORLD = {"train_images": 96, "val_images": 8, "test_images": 16, "vqa_per_image": 1}
QUICK_EVAL = ("evaluation.limit=8", "evaluation.progress=false")


def hydra_config(overrides: list[str]):
    return compose_config(overrides, resolve=False)


class FitTimer(L.Callback):
    """Wall time from the first training batch's start to the last one's end."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first = self.first or time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last, self.batches = time.perf_counter(), self.batches + 1


def pipeline_overrides(data_root: Path, run_root: Path, max_steps: int | None, quick: bool) -> list[str]:
    overrides = [
        "experiment=tiny_cpu",
        f"data.root={data_root}",
        f"run_dir={run_root / 'artifacts'}",
        f"logger.tracking_uri=sqlite:///{run_root / 'mlflow.db'}",
        f"logger.artifact_location={run_root / 'mlartifacts'}",
    ]
    if quick:
        overrides += ["trainer.enable_progress_bar=false", "logger.log_system_metrics=false"]
    if max_steps is not None:
        overrides += [f"stage.max_steps={max_steps}"]  # every training stage
        overrides += [f"backbones.{part}.max_steps={max_steps}" for part in ("vision", "language")]
    return overrides


def run_pipeline(
    data_root: Path, run_root: Path, overrides: list[str], evaluate: bool, eval_overrides=()
) -> dict:
    from moe_llava.pretrain import run_backbones
    from moe_llava.training.run import COMPLETED, run_stage

    stages = {}
    for stage in STAGES:
        command_line = [*overrides, f"stage={'stage1' if stage == 'backbones' else stage}"]
        cfg = hydra_config(command_line)
        timer = FitTimer()
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's and the stages' prints: not the table
            if stage == "backbones":
                run_backbones(cfg)
                result = {}
            else:
                result = run_stage(cfg, callbacks=[timer])
        seconds = time.perf_counter() - start
        stage_dir = Path(cfg.run_dir) / stage
        export_config = stage_dir / "export" / "config.json"
        stages[stage] = {
            "seconds": seconds,
            "fit_s": None if timer.last is None else timer.last - timer.first,
            "train_batches": timer.batches,
            "global_step": result.get("global_step"),
            "completed": stage == "backbones" or (stage_dir / COMPLETED).is_file(),
            "export_is_moe": json.loads(export_config.read_text()).get("moe") is not None
            if export_config.is_file()
            else None,
        }
        print(f"[e2e] {stage}: {seconds:6.1f} s", file=sys.stderr)
    evaluation = {"status": "skipped", "seconds": None}
    if evaluate:
        command = [sys.executable, "-m", "moe_llava.evaluate", *overrides, *eval_overrides, "stage=stage3"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
        evaluation = {
            "status": "ok" if proc.returncode == 0 else f"failed ({proc.returncode}): {proc.stderr[-2000:]}",
            "seconds": time.perf_counter() - start,
        }
    return {"stages": stages, "evaluation": evaluation}


def run(data_root: str | None = None, quick=False, max_steps=None, evaluate=True, overrides=()) -> dict:
    from moe_llava.data.shapesworld import generate_shapesworld

    run_root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        root = Path(data_root) if data_root else REPO_ROOT / "data" / "shapesworld"
        if quick or not (root / "instruct_train.json").is_file():
            root = run_root / "shapesworld"
            generate_shapesworld(root, SMALL_WORLD if quick else None)
        max_steps = 2 if quick and max_steps is None else max_steps
        command_line = [*pipeline_overrides(root, run_root, max_steps, quick), *overrides]
        pipeline = run_pipeline(root, run_root, command_line, evaluate, QUICK_EVAL if quick else ())
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    stages = pipeline["stages"]
    return {
        "config": {
            "data_root": str(root),
            "quick": quick,
            "max_steps": max_steps,
            "overrides": list(overrides),
        },
        **pipeline,
        "total_seconds": sum(s["seconds"] for s in stages.values()),
    }


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", help="a ShapesWorld folder (default: data/shapesworld, else generated)"
    )
    parser.add_argument(
        "--max-steps", type=int, help="cap every stage (and backbone part) at this many steps"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after stage 3")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    args = parser.parse_args(argv)
    result = run(args.data_root, args.quick, args.max_steps, not args.no_eval, args.override)
    print(f"{'step':12s} {'seconds':>8s} {'fit s':>8s} {'steps':>6s}")
    for stage, info in result["stages"].items():
        fit = "-" if info["fit_s"] is None else f"{info['fit_s']:.1f}"
        print(f"{stage:12s} {info['seconds']:8.1f} {fit:>8s} {info['global_step'] or '-':>6}")
    print(f"{'total':12s} {result['total_seconds']:8.1f}")
    evaluation = result["evaluation"]
    if evaluation["seconds"] is not None:
        print(f"{'evaluation':12s} {evaluation['seconds']:8.1f}  {evaluation['status']}")
    print(f"written: {common.write_result(SUITE, result, args.out)}")


if __name__ == "__main__":
    main()
