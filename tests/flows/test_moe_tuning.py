"""The `moe-tuning` flow as users run it: a real Prefect server on 127.0.0.1, the deployments
served, `prefect deployment run moe-tuning/full --watch` (through `python -m flows.local`, what
`make run` runs), in a clone of the repository on a tiny ShapesWorld and a shrunk preset."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.project import clone_overrides, clone_with_tiny_data, command_env, sh
from tests.training.faults import attempts, trained_sequence

# No model weights as MLflow artifacts: the registry's model still carries the export.
SHRUNK = [
    *clone_overrides(),
    "logger.log_model_weights=false",
    "evaluation.limit=3",
    "evaluation.progress=false",
]


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    """A clone with a tiny ShapesWorld, and a Prefect home of its own (no server yet)."""
    env = command_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    return clone_with_tiny_data(tmp_path / "project", env), env


def mlflow_runs(clone: Path) -> list:
    from mlflow.tracking import MlflowClient

    # Not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI to later subprocesses.
    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-cpu")
    return client, client.search_runs([experiment.experiment_id])


def flow_steps(clone: Path, env: dict, extra: tuple[str, ...] = (), **parameters) -> list[str]:
    """Call the flow in-process in the clone (Prefect's ephemeral mode) with SHRUNK (+ ``extra``
    overrides); its step names."""
    script = (
        "import json, sys; from flows.moe_tuning import moe_tuning; "
        "r = moe_tuning(overrides=json.loads(sys.argv[1]), **json.loads(sys.argv[2])); "
        "print('STEPS', json.dumps([s['name'] for s in r['steps']]))"
    )
    out = sh(
        sys.executable,
        "-c",
        script,
        json.dumps([*SHRUNK, *extra]),
        json.dumps(parameters),
        cwd=clone,
        env=env,
        timeout=300,
    )
    return json.loads(out.split("STEPS ", 1)[1].splitlines()[0])


def mlflow_server_listing(clone: Path, env: dict, experiment_id: str) -> dict:
    """Start `mlflow server` on the clone's SQLite store (127.0.0.1, a free port), list, stop it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{clone / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{base}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        experiment = call(f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}")["experiment"]
        runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})
        champion = call("/api/2.0/mlflow/registered-models/alias?name=moe-llava&alias=champion")
        return {
            "experiment_kind": {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"],
            "runs": runs["runs"],
            "champion": champion["model_version"],
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_full_deployment_runs_end_to_end_then_skips_what_is_up_to_date(project):
    clone, env = project
    out = sh(sys.executable, "-m", "flows.local", *SHRUNK, cwd=clone, env=env, timeout=900)
    assert "Completed" in out and "| stage3 |" in out and "**champion**" in out
    assert "| backbones |" in out and "Backbones pretrained here: vision tower object-presence F1" in out
    assert "| POPE answered yes | present | absent, shares a colour |" in out  # which objects it imagines

    client, runs = mlflow_runs(clone)
    parents = [r for r in runs if r.data.tags.get("pipeline") == "moe-tuning"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"backbones", "stage1", "stage2", "stage3", "register"} <= children
    assert len([c for c in runs if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 7
    assert "stage3/pope/mean_f1" in parent.data.metrics and "prefect.flow_run_id" in parent.data.tags
    assert 0.0 <= parent.data.metrics["stage3/pope/yes_ratio/shares_colour"] <= 1.0
    champion = client.get_model_version_by_alias("moe-llava", "champion")
    assert str(champion.version) == "1" and parent.data.tags["registry.version"] == "1"

    # What the MLflow UI shows, read over a real `mlflow server`'s REST API.
    listed = mlflow_server_listing(clone, env, parent.info.experiment_id)
    assert listed["experiment_kind"] == "custom_model_development"
    by_id = {r["info"]["run_id"]: r for r in listed["runs"]}
    assert by_id[parent.info.run_id]["info"]["status"] == "FINISHED"
    stage_runs = [r for r in listed["runs"] if r["info"]["run_name"] in ("stage1", "stage2", "stage3")]
    assert len(stage_runs) == 3
    for run in stage_runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        datasets = {d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"]}
        assert datasets and all(name.startswith("shapesworld/") for name in datasets)
    assert listed["champion"]["run_id"] in by_id  # the version links to a run of the pipeline

    # The evaluate pipeline on the registry's champion (a models:/ URI), here called in-process
    # in the clone (Prefect's ephemeral mode): its own folder, its own parent run.
    assert flow_steps(clone, env, pipeline="evaluate", model="models:/moe-llava@champion") == ["evaluate"]
    metrics = json.loads(
        (clone / "artifacts" / "evaluate" / "models_moe-llava_champion" / "metrics.json").read_text()
    )
    assert 0.0 <= metrics["pope/mean_f1"] <= 1.0

    # A second run: every DVC stage is up to date and skipped; the gate compares with the champion.
    out = sh(sys.executable, "-m", "flows.local", *SHRUNK, cwd=clone, env=env, timeout=600)
    for stage in ("backbones", "stage1", "stage2", "stage3", "evaluate-stage2", "evaluate-stage3"):
        assert f"| {stage} |" in out and f"{stage}: up to date, skipped" in out
    assert "version 2 is challenger" in out

    # The stage3 pipeline: MoE-tune again from the stage-2 export given as init_from, then evaluate.
    # Its stage-3 process is SIGKILLed at step 2 (before that step's checkpoint); Prefect retries the
    # step, which resumes from the step-1 checkpoint and trains each sample once.
    faults = "tests.training.faults"
    killed_at_step_2 = (
        f"+callbacks.kill={{_target_:{faults}.KillAt,step:2,marker:'{clone.parent / 'killed'}'}}",
        f"+callbacks.log={{_target_:{faults}.BatchLog,path:'{clone.parent / 'batches.jsonl'}'}}",
    )
    steps = flow_steps(
        clone, env, killed_at_step_2, pipeline="stage3", init_from="artifacts/stage2/export",
        register=False, retries=1, retry_delay_seconds=0,
    )  # fmt: skip
    assert steps == ["data", "stage3", "evaluate-stage3"] and (clone.parent / "killed").exists()
    result = json.loads((clone / "artifacts" / "stage3" / "metrics.json").read_text())
    assert result["resumed"] is True and result["global_step"] == 3
    killed, resumed = attempts(clone.parent / "batches.jsonl")
    ids = [i for batch in trained_sequence(killed, resumed) for i in batch["ids"]]
    assert len(ids) == len(set(ids)) == 3 * 8, "3 steps of 8 samples, no sample twice"
    newest_stage3 = next(r for r in mlflow_runs(clone)[1] if r.info.run_name == "stage3")  # newest first
    assert newest_stage3.info.status == "FINISHED" and "upcycled" in newest_stage3.data.tags["model_origin"]
    assert newest_stage3.data.tags["resumed"] == "true"
    assert newest_stage3.data.tags["mlflow.parentRunId"] != parent.info.run_id  # this flow run's parent
    assert not any(r.info.status == "RUNNING" for r in mlflow_runs(clone)[1])


@pytest.mark.slow
def test_a_failing_stage_fails_the_flow_with_its_own_error(project):
    clone, env = project
    bad = [*SHRUNK, "data.max_length=8"]  # every stage-1 sample is over-long: the stage refuses the data
    out = sh(sys.executable, "-m", "flows.local", *bad, cwd=clone, env=env, timeout=600, ok=False)
    assert "Failed" in out
    # DVC exits 255 for a failed stage; the stage's own exit code (2: a user error) is in its last lines
    assert "stage1 failed (exit" in out and "exited with 2" in out and "too_long" in out
    # one line naming the quarantine file, before the model loaded
    assert re.search(r"all \d+ records were rejected; see \S*quarantine\.jsonl", out)
    _, runs = mlflow_runs(clone)
    parent = next(r for r in runs if r.data.tags.get("pipeline") == "moe-tuning")
    assert parent.info.status == "FAILED"
    assert not any(r.info.status == "RUNNING" for r in runs)
