"""The flow's MLflow parent run and its summary (per-stage time and losses, POPE/VQA, the gate).

Reads what the stage commands wrote (``<run_dir>/<stage>/metrics.json``, ``.../eval/metrics.json``)
and the registration's JSON (``registry register --json-out``); computes nothing about models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moe_llava.data.shapesworld.pope import RELATIONS as POPE_GROUPS
from moe_llava.tracking import TrackedRun, tracking_uri

STAGES = ("stage1", "stage2", "stage3")
EVALUATED = ("stage2", "stage3")
POPE_SPLITS = ("random", "popular", "adversarial")


def _client(cfg: dict):
    from mlflow.tracking import MlflowClient

    # Not mlflow.set_tracking_uri: it would export MLFLOW_TRACKING_URI to every step's process.
    return MlflowClient(tracking_uri=tracking_uri(cfg.get("logger")))


def start_parent_run(
    cfg: dict, *, flow_run_id: str, flow_run_name: str, flow_run_url: str | None
) -> TrackedRun:
    """A new MLflow run for this flow run; the stage, evaluation and registration runs nest under it.

    Use it as a context manager around the flow's steps: it ends FINISHED, KILLED or FAILED.
    Driven through the client only: ``mlflow.set_tracking_uri`` would export ``MLFLOW_TRACKING_URI``
    to every step's process.
    """
    tags = {
        "prefect.flow_run_id": flow_run_id,
        "prefect.flow_run_name": flow_run_name,
        "pipeline": "moe-tuning",
        "prefect.flow_run_url": flow_run_url,
    }
    return TrackedRun.start(
        run_name=f"pipeline {flow_run_name}",
        experiment_name=cfg["experiment_name"],
        logger_cfg=cfg.get("logger"),
        tags=tags,
        fluent=False,
    )


def run_url(cfg: dict, run_id: str) -> str:
    """The run's page in the MLflow UI (the tracking server's, else `mlflow ui`'s default address),
    in the UI's model-training view: MLflow 3.17's UI opens on GenAI traces unless the URL says so."""
    client = _client(cfg)
    base = client.tracking_uri if client.tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    experiment_id = client.get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(run_dir: Path, steps: list[dict[str, Any]], decision: dict[str, Any] | None) -> dict[str, Any]:
    train = {stage: _read(run_dir / stage / "metrics.json") for stage in STAGES}
    evals = {stage: _read(run_dir / stage / "eval" / "metrics.json") for stage in EVALUATED}
    plot = run_dir / "stage3" / "eval" / "expert_load.png"
    return {
        "steps": [{k: s[k] for k in ("name", "seconds", "skipped")} for s in steps],
        "train": {s: {k: v for k, v in m.items() if k in ("train/loss", "val/loss", "global_step")} for s, m in train.items()},
        "eval": {
            s: {k: v for k, v in m.items() if re.fullmatch(r"pope/(\w+/)?(f1|accuracy|yes_ratio)|pope/mean_f1|pope/yes_ratio/\w+|vqa/\w+/accuracy", k)}
            for s, m in evals.items()
        },
        "backbones": _read(run_dir / "backbones" / "metrics.json"),
        "decision": decision,
        "expert_load_plot": str(plot) if plot.is_file() else None,
    }  # fmt: skip


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def markdown(report: dict[str, Any], cfg: dict, parent_run_id: str, flow_run_url: str | None) -> str:
    uri = tracking_uri(cfg.get("logger"))
    lines = [
        f"# MoE-Tuning: {cfg['experiment_name']}",
        "",
        "| step | time | status | train loss | val loss |",
        "|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        losses = report["train"].get(step["name"], {})
        status = "up to date (skipped)" if step["skipped"] else "ran"
        lines.append(
            f"| {step['name']} | {step['seconds']:.0f} s | {status} | {_fmt(losses.get('train/loss'))} | {_fmt(losses.get('val/loss'))} |"
        )
    lines += [
        "",
        "| evaluated | POPE random F1 | popular F1 | adversarial F1 | **mean F1** | VQA test acc |",
        "|---|---|---|---|---|---|",
    ]
    for stage, m in report["eval"].items():
        if m:
            splits = " | ".join(_fmt(m.get(f"pope/{s}/f1")) for s in POPE_SPLITS)
            lines.append(
                f"| {stage} | {splits} | **{_fmt(m.get('pope/mean_f1'))}** | {_fmt(m.get('vqa/test/accuracy'))} |"
            )
    groups = [(stage, m) for stage, m in report["eval"].items() if m and "pope/yes_ratio/present" in m]
    if groups:  # which absent objects the model says "yes" to (data.eval.pope_groups)
        lines += [
            "",
            "| POPE answered yes | present | absent, shares a colour | shares a shape | shares both | unrelated |",
            "|---|---|---|---|---|---|",
        ]
        for stage, m in groups:
            cells = " | ".join(_fmt(m.get(f"pope/yes_ratio/{g}")) for g in POPE_GROUPS)
            lines.append(f"| {stage} | {cells} |")
    backbones = report.get("backbones") or {}
    if "vision/val/presence_f1" in backbones or "language/val/loss" in backbones:
        lines += [
            "",
            f"Backbones pretrained here: vision tower object-presence F1 (val) "
            f"{_fmt(backbones.get('vision/val/presence_f1'))}, LM val loss {_fmt(backbones.get('language/val/loss'))}",
        ]
    decision = report.get("decision")
    if decision:
        gate = decision["decision"]
        verdict = "**champion**" if decision["champion"] else "challenger"
        lines += [
            "",
            f"Registry: `{decision['model_name']}` version {decision['version']} is {verdict}: {gate['reason']}",
        ]
    if report.get("expert_load_plot"):
        lines += ["", f"Expert load by modality (stage 3): `{report['expert_load_plot']}`"]
    lines += [
        "",
        f"MLflow parent run: {run_url(cfg, parent_run_id)}"
        + (f" (after `mlflow ui --backend-store-uri {uri}`)" if uri.startswith("sqlite") else ""),
        f"Prefect flow run: {flow_run_url or '-'} (`prefect server start` for the UI)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def finish_parent_run(parent: TrackedRun, report: dict[str, Any], markdown_text: str) -> None:
    """Headline numbers as the parent run's metrics and tags; the summary as its artifact."""
    metrics = {
        f"{stage}/{key}": float(m[key])
        for stage, m in report["eval"].items()
        for key in ("pope/mean_f1", "vqa/test/accuracy", "pope/yes_ratio/shares_colour")
        if isinstance(m.get(key), (int, float))
    }
    metrics.update({f"time_s/{step['name']}": float(step["seconds"]) for step in report["steps"]})
    parent.log_metrics(metrics)
    decision = report.get("decision")
    if decision:
        parent.set_tags(
            {
                "registry.version": str(decision["version"]),
                "registry.champion": str(decision["champion"]).lower(),
            }
        )
    parent.log_text(markdown_text, "summary.md")
