"""The `moe-tuning` flow as users run it: a real Prefect server on 127.0.0.1, the deployments
served, `prefect deployment run moe-tuning/full --watch` (through `python -m flows.local`, what
`make run` runs), in a clone of the repository on a tiny ShapesWorld and a shrunk preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_llava.data.shapesworld import generate_shapesworld
from tests.training.conftest import TINY_WORLD

REPO = Path(__file__).resolve().parents[2]
SHRUNK = [
    "experiment=tiny_cpu",
    "model.vision_tower.config.image_size=32",
    "model.vision_tower.config.patch_size=8",
    "model.vision_tower.config.hidden_size=32",
    "model.vision_tower.config.intermediate_size=64",
    "model.vision_tower.config.num_hidden_layers=2",
    "model.language_model.config.hidden_size=32",
    "model.language_model.config.intermediate_size=64",
    "data.max_length=1024",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger.log_system_metrics=false",
    "logger.log_model_weights=false",
    "stage.max_steps=2",
    "stage.micro_batch_size=4",
    "stage.global_batch_size=4",
    "evaluation.limit=3",
    "evaluation.progress=false",
]


def sh(
    *args: str, cwd: Path, env: dict, timeout: float = 120, ok: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert (proc.returncode == 0) == ok, (
        f"{args}: rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    """A git clone of the repository whose data.dvc tracks a tiny ShapesWorld."""
    clone = tmp_path / "project"
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    for inherited in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # the clone's own server and mlflow.db
        env.pop(inherited, None)
    sh("git", "clone", "-q", str(REPO), str(clone), cwd=tmp_path, env=env)
    generate_shapesworld(clone / "data" / "shapesworld", TINY_WORLD)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data", cwd=clone, env=env)
    sh("git", "commit", "-qam", "tiny data", cwd=clone, env=env)
    return clone, env


def mlflow_runs(clone: Path) -> list:
    from mlflow.tracking import MlflowClient

    # Not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI to later subprocesses.
    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-cpu")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_full_deployment_runs_end_to_end_then_skips_what_is_up_to_date(project):
    clone, env = project
    proc = sh(sys.executable, "-m", "flows.local", *SHRUNK, cwd=clone, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert "Completed" in out and "| stage3 |" in out and "**champion**" in out

    client, runs = mlflow_runs(clone)
    parents = [r for r in runs if r.data.tags.get("pipeline") == "moe-tuning"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"stage1", "stage2", "stage3", "register"} <= children
    assert len([c for c in runs if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 6
    assert "stage3/pope/mean_f1" in parent.data.metrics and "prefect.flow_run_id" in parent.data.tags
    champion = client.get_model_version_by_alias("moe-llava", "champion")
    assert str(champion.version) == "1" and parent.data.tags["registry.version"] == "1"

    # A second run: every DVC stage is up to date and skipped; the gate compares with the champion.
    proc = sh(sys.executable, "-m", "flows.local", *SHRUNK, cwd=clone, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    for stage in ("stage1", "stage2", "stage3", "evaluate-stage2", "evaluate-stage3"):
        assert f"| {stage} |" in out and f"{stage}: up to date, skipped" in out
    assert "version 2 is challenger" in out


@pytest.mark.slow
def test_a_failing_stage_fails_the_flow_with_its_own_error(project):
    clone, env = project
    bad = [*SHRUNK, "data.max_length=8"]  # every stage-1 sample is over-long: the stage refuses the data
    proc = sh(sys.executable, "-m", "flows.local", *bad, cwd=clone, env=env, timeout=600, ok=False)
    out = proc.stdout + proc.stderr
    assert "Failed" in out
    assert "stage1 failed (exit" in out and "RejectedFractionError" in out and "too_long" in out
    _, runs = mlflow_runs(clone)
    parent = next(r for r in runs if r.data.tags.get("pipeline") == "moe-tuning")
    assert parent.info.status == "FAILED"
    assert not any(r.info.status == "RUNNING" for r in runs)
