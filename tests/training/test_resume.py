"""MLflow tracking of stages (real SQLite store), and resuming a stage whose process was killed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from moe_llava.tracking import RUN_ID_FILE, data_hash, lock_hash
from moe_llava.training import run_stage
from moe_llava.training.run import join_interrupted_log
from tests.training.conftest import shrunk_overrides
from tests.training.faults import attempts, trained_sequence


def _client(tmp_path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return MlflowClient()


@pytest.mark.timeout(300)
def test_stage_run_nested_under_pipeline_run_with_params_tags_metrics_and_artifacts(
    compose_stage, dense_export, tmp_path
):
    client = _client(tmp_path)
    experiment_id = client.create_experiment(
        "tiny-cpu", artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    parent = client.create_run(experiment_id, run_name="pipeline")
    result = run_stage(
        compose_stage("stage3", f"init_from={dense_export}", f"parent_run_id={parent.info.run_id}")
    )
    assert result["global_step"] == 3

    run_id = (tmp_path / "artifacts" / "stage3" / RUN_ID_FILE).read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["stage"] == "stage3" and len(run.data.tags["git_commit"]) == 40
    assert run.data.tags["lock_hash"] == lock_hash() != "absent"
    assert '"num_experts": 4' in run.data.tags["moe"]
    assert run.data.params["stage.lr"] == "0.0005" and run.data.params["moe.capacity_factor"] == "1.5"
    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/lm_loss",
        "train/aux_loss",
        "train/tokens_per_sec",
        "train/samples_per_sec",
        "lr-AdamW",
        "trainable_parameters",
        "moe/layer0/expert0_load",
        "moe/layer2/drop_rate",
        "moe/layer0/entropy",
        "moe/layer0/image_expert3_load",
        "moe/layer0/text_expert3_load",
    ):
        assert key in metrics, key
    loads = [metrics[f"moe/layer0/expert{e}_load"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "export"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert "export/model.safetensors" in exported and "export/tokenizer.json" in exported
    assert "upcycled layers [0, 2]" in run.data.tags["model_origin"]
    # The UI: a model-training experiment, the stage's data as dataset inputs (digest: data.dvc's md5)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"shapesworld/instruct_train", "shapesworld/instruct_val"}
    assert [t.value for t in inputs["shapesworld/instruct_train"].tags] == ["training"]
    assert inputs["shapesworld/instruct_train"].dataset.digest == data_hash().removesuffix(".dir")
    # Lightning's CSV log beside the stage, the loss curve `dvc plots` draws
    csv_log = (tmp_path / "artifacts" / "stage3" / "logs" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in csv_log[0].split(",") and len(csv_log) >= 4


def _launch_stage(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moe_llava.train", *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill_after_checkpoint(proc: subprocess.Popen, checkpoints: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if list(checkpoints.glob("step*.ckpt")) and (checkpoints / "last.ckpt").exists():
                break
            assert proc.poll() is None, "the stage ended before a checkpoint was written"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within the timeout")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a node failure would: no cleanup runs
        proc.wait(timeout=30)


def _killed_at(step: int, tmp_path: Path) -> list[str]:
    return [
        f"+callbacks.batch_log={{_target_:tests.training.faults.BatchLog,path:'{tmp_path}/batches.jsonl'}}",
        f"+callbacks.kill={{_target_:tests.training.faults.KillAt,step:{step},marker:'{tmp_path}/killed'}}",
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kill_step", [4, 7], ids=["mid-epoch", "after-an-epoch-end-checkpoint"])
def test_killed_stage_resumes_where_it_stood_in_the_same_mlflow_run(
    shapesworld, compose_stage, tmp_path, kill_step
):
    """SIGKILL at a step (before its checkpoint): the re-run resumes from the last checkpoint, trains
    the rest of the interrupted epoch (each sample once, in the epoch's order) and ends at the same
    global step as an uninterrupted run, in the same MLflow run."""
    # 48 captions, 4 per micro-batch, 2 micro-batches per step: 6 steps per epoch
    overrides = ["stage.max_steps=8", *_killed_at(kill_step, tmp_path)]
    stage_dir = tmp_path / "artifacts" / "stage1"
    killed = subprocess.run(
        [sys.executable, "-m", "moe_llava.train", *shrunk_overrides(shapesworld, tmp_path), "stage=stage1", *overrides],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client = _client(tmp_path)
    dead_run_id = (stage_dir / RUN_ID_FILE).read_text()
    assert client.get_run(dead_run_id).info.status == "RUNNING"  # what a killed process leaves behind
    assert not (stage_dir / "COMPLETED").exists()
    assert not (stage_dir / "export").exists(), "a killed stage leaves no export to be taken as done"
    checkpointed = max(
        int(p.stem.removeprefix("step")) for p in (stage_dir / "checkpoints").glob("step*.ckpt")
    )
    assert checkpointed == kill_step - 1

    result = run_stage(compose_stage("stage1", *overrides))
    assert result["resumed"] is True and result["global_step"] == 8
    first_attempt, resumed = attempts(tmp_path / "batches.jsonl")
    assert resumed[0]["step"] == checkpointed + (resumed[0]["batch_idx"] % 2 == 1)
    trained = trained_sequence(first_attempt, resumed)
    assert len(trained) == 8 * 2, "8 steps of 2 micro-batches, none repeated, none skipped"
    by_epoch: dict[int, list[str]] = {}
    for batch in trained:
        by_epoch.setdefault(batch["epoch"], []).extend(batch["ids"])
    assert len(by_epoch[0]) == 48 and len(set(by_epoch[0])) == 48, "epoch 0: every sample once"
    assert len(by_epoch[1]) == len(set(by_epoch[1])) == 16 and set(by_epoch[1]) <= set(by_epoch[0])
    assert by_epoch[1] != by_epoch[0][:16], "epoch 1 is drawn in its own order, not epoch 0's again"
    assert [b["batch_idx"] for b in trained] == [*range(12), *range(4)]

    assert (stage_dir / RUN_ID_FILE).read_text() == dead_run_id
    run = client.get_run(dead_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    steps = {m.step for m in client.get_metric_history(dead_run_id, "train/loss")}
    # The resumed attempt logs every step from the checkpoint on; the killed one's steps before it
    # stay, except perhaps the last: Lightning writes a step's checkpoint before logging its metrics.
    assert max(steps) == 7 and set(range(checkpointed, 8)) <= steps, "steps continue from the checkpoint"
    assert set(range(checkpointed - 1)) <= steps, "the killed attempt's metrics are kept"

    # The CSV log (`dvc plots`) holds both attempts: every step once.
    with (stage_dir / "logs" / "metrics.csv").open(newline="") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(logged) == list(range(8)) and not (stage_dir / "logs" / "metrics.interrupted.csv").exists()

    # A completed stage re-run starts over (fresh run), it does not "resume" a finished one.
    again = run_stage(compose_stage("stage1", "stage.max_steps=2"))
    assert again["resumed"] is False and (stage_dir / RUN_ID_FILE).read_text() != dead_run_id


@pytest.mark.timeout(600)
def test_killed_stage_not_resumed_is_marked_failed(shapesworld, compose_stage, tmp_path):
    long_run = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage1",
        "stage.max_steps=500",
    ]
    stage_dir = tmp_path / "artifacts" / "stage1"
    _kill_after_checkpoint(_launch_stage(long_run), stage_dir / "checkpoints")
    dead_run_id = (stage_dir / RUN_ID_FILE).read_text()
    result = run_stage(compose_stage("stage1", "resume=never", "stage.max_steps=2"))
    assert result["resumed"] is False and result["global_step"] == 2
    client = _client(tmp_path)
    assert client.get_run(dead_run_id).info.status == "FAILED"
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED", "FINISHED"}


def test_interrupted_csv_logs_are_joined_keeping_rows_before_the_resume_step(tmp_path):
    def write(path: Path, rows: list[dict]) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    earlier, current = tmp_path / "metrics.interrupted.csv", tmp_path / "metrics.csv"
    write(earlier, [{"step": s, "train/loss": 10 - s} for s in range(5)])  # killed after step 4
    write(current, [{"step": s, "train/loss": 20 - s, "lr": 0.1} for s in range(3, 6)])  # resumed at 3
    join_interrupted_log(earlier, current)
    with current.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["lr"]) for r in rows] == [
        ("0", "10", ""), ("1", "9", ""), ("2", "8", ""), ("3", "17", "0.1"), ("4", "16", "0.1"), ("5", "15", "0.1")
    ]  # fmt: skip
    assert not earlier.exists()
