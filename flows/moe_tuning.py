"""The `moe-tuning` Prefect flow: data -> backbones -> stages 1-3 -> evaluation -> registration.

Orchestration only. Every step is a command of the `moe_llava` package run as a subprocess (so
Lightning's launchers, torchrun and GPUs work, and a timeout really stops it); the training and
evaluation steps run as DVC stages (`dvc repro --single-item <stage>`), so the flow and
`dvc repro` share one notion of "up to date": a stage whose inputs did not change is skipped.

Deployments (served by flows/serve.py, or `prefect deploy` with flows/prefect.yaml):
  moe-tuning/full      the whole pipeline
  moe-tuning/stage3    upcycle and MoE-tune from `init_from` (a stage-2 export or an MoE checkpoint)
  moe-tuning/evaluate  evaluate `model` (a folder or a models:/ URI)
  moe-tuning/benchmark the paper's benchmark table of `model` through lmms-eval (`moe-llava eval
                       benchmark`, in .venv-lmms: make setup-lmms)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows import summary
from moe_llava.tracking import PARENT_RUN_ENV

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 40  # of a failed step's output, in its error
KEPT_LINES = 400  # of every step's output, for the summary (the registration's JSON)
PROGRESS_EVERY_S = 10.0  # one progress-bar line per this many seconds reaches the Prefect log


class StepFailed(RuntimeError):
    """A step's command exited non-zero; the message carries the last lines it printed."""


@task(task_run_name="{name}")
def run_step(name: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one command, streaming its lines into the Prefect log; fail with its last lines."""
    logger = get_run_logger()
    logger.info("%s: %s", name, " ".join(argv))
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=KEPT_LINES)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # `python` in dvc.yaml's commands: this interpreter's environment, whoever started the worker.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    last_progress = 0.0
    buffer = b""
    assert proc.stdout is not None
    # Progress bars redraw with '\r': split on both, and pass one redraw per PROGRESS_EVERY_S.
    while chunk := proc.stdout.read1(65536):
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            tail.append(line)
            is_progress = "it/s]" in line or "s/it]" in line or re.search(r"\d+/\d+ \[", line)
            now = time.monotonic()
            if is_progress and now - last_progress < PROGRESS_EVERY_S:
                continue
            last_progress = now if is_progress else last_progress
            logger.info("%s | %s", name, line)
    if buffer.strip():
        tail.append(buffer.decode(errors="replace").rstrip())
    code = proc.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        raise StepFailed(
            f"{name} failed (exit {code}) after {seconds:.0f} s; its last lines:\n"
            + "\n".join(list(tail)[-TAIL_LINES:])
        )
    output = "\n".join(tail)
    skipped = bool(
        re.search(r"didn't change, skipping|is cached - skipping|up to date with data.dvc", output)
    )
    logger.info("%s: %s in %.0f s", name, "up to date, skipped" if skipped else "done", seconds)
    return {"name": name, "seconds": seconds, "skipped": skipped, "output": output}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def dvc_stage(stage: str) -> list[str]:
    return python("-m", "dvc", "repro", "--single-item", stage)


def benchmark_step(
    step,
    model: str,
    tasks: str,
    limit: int | None,
    experiment_name: str | None,
    benchmark_dir: str | None,
    benchmark_args: list[str] | None,
) -> dict[str, Any]:
    """`moe-llava eval benchmark` of ``model`` into ``<benchmark_dir>/<model>/<flow run>``; its table
    as a markdown artifact, its metrics as the result."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    out = Path(benchmark_dir or ROOT / "artifacts" / "benchmark") / name / str(flow_run.id)
    argv = python(
        "-m", "moe_llava.cli", "eval", "benchmark", "--model", model, "--tasks", tasks,
        "--output-dir", str(out),
        *(["--limit", str(limit)] if limit else []),
        *(["--experiment", experiment_name] if experiment_name else []),
        *(benchmark_args or []),
    )  # fmt: skip
    result = step("benchmark", argv)
    table = (out / "table.txt").read_text()
    create_markdown_artifact(
        f"# Benchmark: {model} ({tasks})\n\n```\n{table}\n```\n",
        key="benchmark-table",
        description="lmms-eval metrics beside the paper's numbers",
    )
    print(table)
    return {
        "steps": [{k: result[k] for k in ("name", "seconds", "skipped")}],
        "metrics": json.loads((out / "metrics.json").read_text()),
        "output_dir": str(out),
    }


@flow(name="moe-tuning", log_prints=True)
def moe_tuning(
    pipeline: Literal["full", "stage3", "evaluate", "benchmark"] = "full",
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    register: bool = True,
    init_from: str | None = None,
    model: str | None = None,
    retries: int = 0,
    retry_delay_seconds: float = 30.0,
    tasks: str = "paper",
    limit: int | None = None,
    benchmark_dir: str | None = None,
    benchmark_args: list[str] | None = None,
) -> dict[str, Any]:
    """MoE-Tuning as one tracked run.

    pipeline: full (data, stages 1-3, evaluation of stages 2 and 3, registration), stage3 (from
    ``init_from``), evaluate (``model``: a folder or a models:/ URI), or benchmark (``model``
    through lmms-eval: ``tasks`` paper | paper-all | shapesworld | names, ``limit``, extra
    ``benchmark_args`` of ``moe-llava eval benchmark``). overrides: Hydra
    overrides, e.g. ["experiment=phi2_clip336"] (default: the embedded tiny CPU preset).
    retries: how often a failed step is retried (transient failures), with a delay between tries.
    """
    logger = get_run_logger()
    step = run_step.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    if pipeline == "benchmark":  # no training config: the model and lmms-eval's tasks are all it needs
        if not model:
            raise ValueError("the benchmark pipeline needs model (a folder or a models:/ URI)")
        return benchmark_step(step, model, tasks, limit, experiment_name, benchmark_dir, benchmark_args)
    overrides = list(overrides or ["experiment=tiny_cpu"])
    if experiment_name:
        overrides.append(f"experiment_name={experiment_name}")

    # The parameter files that dvc.yaml reads, composed from conf/ with this run's overrides.
    step("params", python("-m", "moe_llava.cli", "pipeline", "params", *overrides))
    cfg = yaml.safe_load((ROOT / "params" / "stage3.yaml").read_text())
    run_dir, experiment = Path(cfg["run_dir"]), cfg["experiment_name"]
    ui_url = flow_run.ui_url if str(flow_run.ui_url).startswith("http") else None  # None without a UI
    parent = summary.start_parent_run(
        cfg, flow_run_id=str(flow_run.id), flow_run_name=str(flow_run.name), flow_run_url=ui_url
    )
    with parent:  # FINISHED, or KILLED / FAILED with the error
        logger.info("MLflow parent run %s in experiment %r", parent.run_id, experiment)
        # The two runs point at each other: tags on the MLflow run, a link artifact on the flow run.
        create_link_artifact(
            summary.run_url(cfg, parent.run_id), link_text="MLflow parent run", key="mlflow-run"
        )
        env = {PARENT_RUN_ENV: parent.run_id}  # every stage, evaluation and registration nests under it
        steps: list[dict[str, Any]] = []
        if pipeline in ("full", "stage3"):
            steps.append(step("data", python("-m", "flows.data"), env))
        if pipeline == "full":
            for stage in ("backbones", "stage1", "stage2", "stage3"):
                steps.append(step(stage, dvc_stage(stage), env))
            for stage in ("stage2", "stage3"):
                steps.append(step(f"evaluate-{stage}", dvc_stage(f"evaluate@{stage}"), env))
        elif pipeline == "stage3":
            if not init_from:
                raise ValueError(
                    "the stage3 pipeline needs init_from (a stage-2 export or an MoE checkpoint)"
                )
            train = python("-m", "moe_llava.train", *overrides, "stage=stage3", f"init_from={init_from}")
            steps.append(step("stage3", train, env))
            evaluate = python("-m", "moe_llava.evaluate", *overrides, "stage=stage3")
            steps.append(step("evaluate-stage3", evaluate, env))
        else:
            if not model:
                raise ValueError("the evaluate pipeline needs model (a folder or a models:/ URI)")
            out = run_dir / "evaluate" / re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
            evaluate = python(
                "-m", "moe_llava.evaluate", *overrides, "stage=stage3",
                f"evaluation.model_dir={model}", f"evaluation.output_dir={out}",
            )  # fmt: skip
            steps.append(step("evaluate", evaluate, env))
        decision = None
        if register and pipeline != "evaluate":
            reg = step(
                "register",
                python(
                    "-m", "moe_llava.cli", "registry", "register",
                    "--model-dir", str(run_dir / "stage3" / "export"),
                    "--metrics", str(run_dir / "stage3" / "eval" / "metrics.json"),
                    "--config", str(ROOT / "params" / "stage3.yaml"),
                    *[arg for o in overrides for arg in ("-o", o)],
                ),
                env,
            )  # fmt: skip
            steps.append(reg)
            decision = summary.registry_decision(reg["output"])
        report = summary.collect(run_dir, steps, decision)
        markdown = summary.markdown(report, cfg, parent.run_id, ui_url)
        summary.finish_parent_run(parent, report, markdown)
    (ROOT / run_dir / "summary.md").write_text(markdown)
    create_markdown_artifact(markdown, key="moe-tuning-summary", description="MoE-Tuning run summary")
    print(markdown)
    return report
