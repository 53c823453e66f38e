"""End-to-end benchmark: wall time of each stage of the tiny_cpu pipeline, as a user runs it.

Each stage is :func:`moe_llava.training.run.run_stage` on the real Hydra config composed with
``experiment=tiny_cpu stage=<stage>`` (what ``python -m moe_llava.train`` runs), with the run
folder and the MLflow database/artifacts in a temporary folder. A stage's time covers everything
``run_stage`` does: loading the previous export (and upcycling in stage 3), data preparation
(validation), the Trainer's fit, the export and the MLflow logging; ``fit_s`` is the part inside
``Trainer.fit`` (from the first to the last training batch), measured by a callback.

Full mode runs the real preset on ``data/shapesworld`` (generated at the default size into a
temporary folder when absent). ``--quick`` shrinks it: a small generated ShapesWorld,
``max_steps`` 2 per stage, no progress bar and no MLflow system-metrics sampling, and the
evaluation limited to the first 8 questions of each file (``evaluation.limit=8``).

Evaluation: when the project has its evaluation entry point (``python -m moe_llava.evaluate
experiment=tiny_cpu stage=stage3``), it runs after stage 3 on the same run folder and its wall
time is reported; otherwise the result says it is unavailable (:func:`run_evaluation` is the hook).

Nothing is interleaved here: a pipeline run is the unit, ``repeats`` runs it again in a fresh
folder (medians/min/max per stage). Imports and the one-off ShapesWorld generation happen before
the clock starts; the first stage includes creating the MLflow database, as a first run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import common, models, world
from bench.data_pipeline import compose
from bench.timing import LoadMonitor, summarize

NAME = "e2e"
STAGES = ("backbones", "stage1", "stage2", "stage3")  # backbones: the embedded default's pretraining step
EVAL_MODULE = (
    "moe_llava.evaluate"  # Hydra entry: python -m moe_llava.evaluate experiment=tiny_cpu stage=stage3
)


@dataclass
class E2EBenchConfig:
    data_root: str | None = None  # None: data/shapesworld when present, else a generated one
    generate_world: bool = False  # always a generated small ShapesWorld (quick)
    stages: tuple[str, ...] = STAGES
    max_steps: int | None = None  # None: the preset's (full epochs); > 0 caps every stage
    quick_settings: bool = False  # no progress bar, no MLflow system metrics
    hydra_overrides: tuple[str, ...] = ()  # extra Hydra overrides, e.g. a smaller model in tests
    evaluate: bool = True  # run the evaluation entry point after stage 3 when it exists
    eval_overrides: tuple[str, ...] = ()
    eval_timeout_s: float = 3600.0
    repeats: int = 1
    keep_run_dir: bool = False


FULL = E2EBenchConfig()
QUICK = E2EBenchConfig(
    generate_world=True,
    max_steps=2,
    quick_settings=True,
    eval_overrides=("evaluation.limit=8", "evaluation.progress=false"),
    eval_timeout_s=600.0,
)


def config_from_options(quick: bool = False, **overrides) -> E2EBenchConfig:
    cfg = common.replace_config(QUICK if quick else FULL, NAME, overrides)
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected some of {STAGES}")
    return cfg


def pipeline_overrides(cfg: E2EBenchConfig, data_root: Path, run_root: Path) -> list[str]:
    """The Hydra overrides of one pipeline run (every stage and the evaluation get the same)."""
    overrides = [
        "experiment=tiny_cpu",
        f"data.root={data_root}",
        f"run_dir={run_root / 'artifacts'}",
        f"logger.tracking_uri=sqlite:///{run_root / 'mlflow.db'}",
        f"logger.artifact_location={run_root / 'mlartifacts'}",
    ]
    if cfg.quick_settings:
        overrides += ["trainer.enable_progress_bar=false", "logger.log_system_metrics=false"]
    if cfg.max_steps is not None:
        overrides += [f"++stage_overrides.{stage}.max_steps={int(cfg.max_steps)}" for stage in STAGES[1:]]
        overrides += [f"backbones.{part}.max_steps={int(cfg.max_steps)}" for part in ("vision", "language")]
    return [*overrides, *cfg.hydra_overrides]


def evaluation_available() -> tuple[bool, str]:
    """Whether the evaluation entry point exists (the hook reports why not when it does not)."""
    try:
        found = importlib.util.find_spec(EVAL_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return True, f"python -m {EVAL_MODULE}"
    return False, (
        f"{EVAL_MODULE} does not exist yet (moe_llava.evaluation is being built): no evaluation time; "
        "hook: bench.e2e.run_evaluation"
    )


def run_evaluation(overrides: list[str], timeout_s: float) -> dict:
    """Hook: time ``python -m moe_llava.evaluate <overrides> stage=stage3`` on the pipeline's run folder."""
    ok, how = evaluation_available()
    if not ok:
        return {"status": "unavailable", "reason": how, "seconds": None}
    command = [sys.executable, "-m", EVAL_MODULE, *overrides, "stage=stage3"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "command": command, "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    return {
        "status": "ok" if proc.returncode == 0 else "failed",
        "command": command,
        "returncode": proc.returncode,
        "seconds": seconds,
        "stdout_tail": proc.stdout[-2000:],
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
    }


def _fit_timer():
    import lightning as L

    class FitTimer(L.Callback):
        """Wall time from the first training batch's start to the last one's end, and the batches."""

        def __init__(self):
            self.first: float | None = None
            self.last: float | None = None
            self.batch_start: float | None = None
            self.batch_seconds: list[float] = []

        @property
        def batches(self) -> int:
            return len(self.batch_seconds)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch_start = time.perf_counter()
            if self.first is None:
                self.first = self.batch_start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last = time.perf_counter()
            if self.batch_start is not None:
                self.batch_seconds.append(self.last - self.batch_start)

        @property
        def seconds(self) -> float | None:
            return None if self.first is None or self.last is None else self.last - self.first

    return FitTimer()


def _one_pipeline(cfg: E2EBenchConfig, data_root: Path, log) -> tuple[dict, list[dict]]:
    from moe_llava.training.run import COMPLETED, run_stage

    run_root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    overrides = pipeline_overrides(cfg, data_root, run_root)
    stages: dict[str, dict] = {}
    checks: list[dict] = []
    try:
        for stage in cfg.stages:
            if stage == "backbones":
                from moe_llava.pretrain import run_backbones

                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    run_backbones(compose([*overrides, "stage=stage1"]))
                stages[stage] = {"seconds": time.perf_counter() - start, "fit_s": None, "train_batches": 0,
                                 "batch_seconds": [], "global_step": None, "train_loss": None, "val_loss": None}  # fmt: skip
                log(f"[{NAME}] {stage}: {stages[stage]['seconds']:6.1f} s")
                continue
            command_line = [*overrides, f"stage={stage}"]
            hcfg = compose(command_line)
            timer = _fit_timer()
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Lightning's and run_stage's prints: not the table
                result = run_stage(hcfg, command_line=command_line, callbacks=[timer])
            seconds = time.perf_counter() - start
            stage_dir = Path(hcfg.run_dir) / stage
            export = stage_dir / "export"
            stages[stage] = {
                "seconds": seconds,
                "fit_s": timer.seconds,
                "train_batches": timer.batches,
                "batch_seconds": timer.batch_seconds,
                "global_step": result.get("global_step"),
                "train_loss": result.get("train/loss"),
                "val_loss": result.get("val/loss"),
            }
            config = (
                json.loads((export / "config.json").read_text()) if (export / "config.json").is_file() else {}
            )
            expected = int(cfg.max_steps) if cfg.max_steps and cfg.max_steps > 0 else None
            steps_ok = result.get("global_step", 0) > 0 and (
                expected is None or result["global_step"] == expected
            )
            moe_ok = (config.get("moe") is not None) == (stage == "stage3")
            checks.append(
                common.check(
                    "stage_completed",
                    stage,
                    "the stage wrote COMPLETED and an export, made the expected optimizer steps, "
                    "and its export is MoE exactly in stage 3",
                    (stage_dir / COMPLETED).is_file() and bool(config) and steps_ok and moe_ok,
                    global_step=result.get("global_step"),
                    expected_steps=expected,
                    export_is_moe=config.get("moe") is not None,
                )
            )
            log(
                f"[{NAME}] {stage}: {seconds:6.1f} s (fit {common.fmt(timer.seconds, '.1f')} s, "
                f"{result.get('global_step')} steps)"
            )
        reason = "evaluate=False (--no-eval)" if not cfg.evaluate else "stage3 was not run"
        evaluation = {"status": "skipped", "reason": reason, "seconds": None}
        if cfg.evaluate and "stage3" in cfg.stages:
            evaluation = run_evaluation([*overrides, *cfg.eval_overrides], cfg.eval_timeout_s)
            if evaluation["status"] != "unavailable":
                checks.append(
                    common.check(
                        "evaluation_ran",
                        "evaluation",
                        f"python -m {EVAL_MODULE} ... stage=stage3 exited 0",
                        evaluation["status"] == "ok",
                        status=evaluation["status"],
                        returncode=evaluation.get("returncode"),
                    )
                )
            log(f"[{NAME}] evaluation: {evaluation['status']} {common.fmt(evaluation['seconds'], '.1f')} s")
    finally:
        if not cfg.keep_run_dir:
            shutil.rmtree(run_root, ignore_errors=True)
    return {"run_dir": str(run_root), "stages": stages, "evaluation": evaluation}, checks


def run(cfg: E2EBenchConfig, log=print) -> dict:
    import lightning  # noqa: F401 - import costs stay outside the timed stages

    import moe_llava.training.run  # noqa: F401

    start = time.perf_counter()
    root, source = world.resolve(cfg.data_root, cfg.generate_world, full_size=True)
    runs, checks = [], []
    with LoadMonitor() as load:
        for _ in range(max(1, cfg.repeats)):
            pipeline, run_checks = _one_pipeline(cfg, root, log)
            runs.append(pipeline)
            checks.extend(run_checks)
    per_stage = {
        stage: summarize([r["stages"][stage]["seconds"] for r in runs if stage in r["stages"]])
        for stage in cfg.stages
    }
    totals = [sum(s["seconds"] for s in r["stages"].values()) for r in runs]
    eval_seconds = [r["evaluation"]["seconds"] for r in runs if r["evaluation"].get("seconds") is not None]
    result = {
        "suite": NAME,
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(cfg),
        # The tiny_cpu trainer runs on the CPU: stage 3's MoE blocks take the path they pick there.
        "environment": common.environment(
            torch.device("cpu"), moe_expert_path=[models.expert_path_for("cpu")], load=load.as_dict()
        ),
        "data": {"source": source, "root": str(root)},
        "overrides": pipeline_overrides(cfg, root, Path("<run_dir>")),
        "checks": checks,
        "runs": runs,
        "stage_seconds": per_stage,
        "total_seconds": summarize(totals),
        "evaluation": {
            "status": runs[-1]["evaluation"]["status"],
            "reason": runs[-1]["evaluation"].get("reason"),
            "seconds": summarize(eval_seconds) if eval_seconds else None,
        },
        "total_with_evaluation_seconds": summarize([t + e for t, e in zip(totals, eval_seconds)])
        if len(eval_seconds) == len(totals)
        else None,
        "targets": [],
    }
    return common.finish(result, start)


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = common.header_lines("End-to-end benchmark (tiny_cpu pipeline, run_stage per stage)", result)
    mode = "quick: max_steps " + str(cfg["max_steps"]) if cfg["max_steps"] else "the real preset"
    lines.append(f"data: {result['data']['source']}; {mode}; {len(result['runs'])} run(s)")
    lines.append("")
    header = (
        f"{'stage':12s} {'seconds':>9s} {'min':>8s} {'max':>8s} {'fit s':>8s} {'other s':>8s} {'steps':>6s} "
        f"{'s/step':>7s}"
    )
    lines += [header, "-" * len(header)]
    last = result["runs"][-1]["stages"]
    for stage, stats in result["stage_seconds"].items():
        info = last.get(stage, {})
        fit, total, steps = info.get("fit_s"), info.get("seconds"), info.get("train_batches")
        other = None if fit is None or total is None else total - fit
        per_step = fit / steps if fit is not None and steps else None
        lines.append(
            f"{stage:12s} {common.fmt(stats['median'], '9.1f'):>9s} {common.fmt(stats['min'], '8.1f'):>8s} "
            f"{common.fmt(stats['max'], '8.1f'):>8s} {common.fmt(fit, '8.1f'):>8s} {common.fmt(other, '8.1f'):>8s} "
            f"{common.fmt(info.get('global_step'), 'd'):>6s} {common.fmt(per_step, '7.2f'):>7s}"
        )
    total = result["total_seconds"]
    lines.append(
        f"{'total':12s} {total['median']:9.1f} {total['min']:8.1f} {total['max']:8.1f}   (stages only)"
    )
    ev = result["evaluation"]
    if ev["seconds"] is not None:
        lines.append(f"{'evaluation':12s} {ev['seconds']['median']:9.1f}   ({ev['status']})")
        both = result["total_with_evaluation_seconds"]
        if both:
            lines.append(f"{'total + eval':12s} {both['median']:9.1f}")
    else:
        lines.append(f"evaluation: {ev['status']}" + (f": {ev['reason']}" if ev.get("reason") else ""))
    lines.append(
        "'fit s': first to last training batch (last run); 'other s': the rest of run_stage (model load/upcycling,"
    )
    lines.append(
        "data validation, Trainer setup, export, MLflow logging; stage 1 also creates the MLflow database)"
    )
    lines += ["", *common.checks_lines(result["checks"]), "", *common.verdict_lines(result["targets"])]
    return "\n".join(lines)
