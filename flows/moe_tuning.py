"""The `moe-tuning` Prefect flow: data -> backbones -> stages 1-3 -> evaluation -> registration.

Orchestration only. Every step runs commands of the `moe_llava` package (or DVC) as subprocesses
through :func:`flows.steps.run_command` (so Lightning's launchers, torchrun and GPUs work, and a
timeout really stops them); the training and evaluation steps are DVC stages, run with
`dvc repro --single-item <stage>` unless DVC's status says the stage is up to date, so the flow and
`dvc repro` share one notion of "up to date".

Deployments (served by flows/serve.py, or `prefect deploy` with flows/prefect.yaml):
  moe-tuning/full      the whole pipeline
  moe-tuning/stage3    upcycle and MoE-tune from `init_from` (a stage-2 export or an MoE checkpoint)
  moe-tuning/evaluate  evaluate `model` (a folder or a models:/ URI)
  moe-tuning/benchmark the paper's benchmark table of `model` through lmms-eval (`moe-llava eval
                       benchmark`, in .venv-lmms: make setup-lmms)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows import PROJECT_ROOT, data, summary
from flows.steps import dvc_changes, python, run_command
from moe_llava.pipeline.params import STAGE3_PARAMS
from moe_llava.tracking import PARENT_RUN_ENV


def _finished(name: str, started: float, skipped: bool) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    get_run_logger().info("%s: %s in %.0f s", name, "up to date, skipped" if skipped else "done", seconds)
    return {"name": name, "seconds": seconds, "skipped": skipped}


@task(task_run_name="{name}")
def run_step(name: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one command, its lines streamed into the Prefect log (:func:`flows.steps.run_command`)."""
    started = time.perf_counter()
    run_command(name, argv, log=get_run_logger().info, env=env)
    return _finished(name, started, skipped=False)


@task(task_run_name="{name}")
def dvc_step(name: str, stage: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` unless DVC's status says the stage is up to date."""
    started = time.perf_counter()
    changes = dvc_changes(stage)
    if changes:
        get_run_logger().info("%s: DVC status %s", name, json.dumps(changes))
        run_command(
            name, python("-m", "dvc", "repro", "--single-item", stage), log=get_run_logger().info, env=env
        )
    return _finished(name, started, skipped=not changes)


@task(task_run_name="data")
def data_step(env: dict[str, str] | None = None) -> dict[str, Any]:
    """data/ as data.dvc has it (:func:`flows.data.sync`)."""
    started = time.perf_counter()
    outcome = data.sync(log=get_run_logger().info, env=env)
    get_run_logger().info("data: %s", outcome)
    return _finished("data", started, skipped=outcome == data.UP_TO_DATE)


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
    out = Path(benchmark_dir or PROJECT_ROOT / "artifacts" / "benchmark") / name / str(flow_run.id)
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
        "steps": [result],
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
    retry = {"retries": retries, "retry_delay_seconds": retry_delay_seconds}
    step, stage_step = run_step.with_options(**retry), dvc_step.with_options(**retry)
    if pipeline == "benchmark":  # no training config: the model and lmms-eval's tasks are all it needs
        if not model:
            raise ValueError("the benchmark pipeline needs model (a folder or a models:/ URI)")
        return benchmark_step(step, model, tasks, limit, experiment_name, benchmark_dir, benchmark_args)
    overrides = list(overrides or ["experiment=tiny_cpu"])
    if experiment_name:
        overrides.append(f"experiment_name={experiment_name}")

    # The parameter files that dvc.yaml reads, composed from conf/ with this run's overrides.
    step("params", python("-m", "moe_llava.cli", "pipeline", "params", *overrides))
    cfg = yaml.safe_load((PROJECT_ROOT / STAGE3_PARAMS).read_text())
    run_dir, experiment = PROJECT_ROOT / cfg["run_dir"], cfg["experiment_name"]
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
            steps.append(data_step.with_options(**retry)(env))
        if pipeline == "full":
            for stage in ("backbones", "stage1", "stage2", "stage3"):
                steps.append(stage_step(stage, stage, env))
            for stage in ("stage2", "stage3"):
                steps.append(stage_step(f"evaluate-{stage}", f"evaluate@{stage}", env))
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
            registration = run_dir / "stage3" / "registration.json"
            registration.unlink(missing_ok=True)  # a previous run's
            reg = step(
                "register",
                python(
                    "-m", "moe_llava.cli", "registry", "register",
                    "--model-dir", str(run_dir / "stage3" / "export"),
                    "--metrics", str(run_dir / "stage3" / "eval" / "metrics.json"),
                    "--config", str(PROJECT_ROOT / STAGE3_PARAMS),
                    "--json-out", str(registration),
                    *[arg for o in overrides for arg in ("-o", o)],
                ),
                env,
            )  # fmt: skip
            steps.append(reg)
            decision = json.loads(registration.read_text())
        report = summary.collect(run_dir, steps, decision)
        markdown = summary.markdown(report, cfg, parent.run_id, ui_url)
        summary.finish_parent_run(parent, report, markdown)
    (run_dir / "summary.md").write_text(markdown)
    create_markdown_artifact(markdown, key="moe-tuning-summary", description="MoE-Tuning run summary")
    print(markdown)
    return report
