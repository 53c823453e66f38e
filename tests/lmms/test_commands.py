"""The commands end to end, each in its own process as users run them: lmms-eval's own CLI with
``--model moe_llava``, and ``moe-llava eval benchmark`` through the Prefect deployment (MLflow metrics and artifacts, the registry
version's tags, the table; a failed task fails it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moe_llava.cli import main
from moe_llava.evaluation.lmms_scoring import SHAPESWORLD_IMAGES_ENV
from moe_llava.paths import REPO_ROOT
from tests.lmms.conftest import question_ids

pytestmark = pytest.mark.slow


def test_lmms_eval_cli_runs_our_model_on_our_task(tiny_export, tasks_dir, our_evaluation, world, tmp_path):
    """`lmms-eval --model moe_llava` (the entry point, installed by pip): the answers our evaluator gives."""
    limit = 4  # the first batch of our evaluation (batch size 4): the same prompts in the same batch
    cmd = [
        sys.executable, "-m", "lmms_eval",
        "--model", "moe_llava",
        "--model_args", f"pretrained={tiny_export},dtype=float32",
        "--tasks", "shapesworld_pope_random",
        "--include_path", str(tasks_dir),
        "--batch_size", "4",
        "--limit", str(limit),
        "--output_path", str(tmp_path / "out"),
        "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, SHAPESWORLD_IMAGES_ENV: str(world / "images")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").glob("*/*_results.json")
    results = json.loads(results_file.read_text())["results"]["shapesworld_pope_random"]
    (samples_file,) = (tmp_path / "out").glob("*/*_samples_shapesworld_pope_random.jsonl")
    ids = question_ids(world / "pope_random.jsonl", limit)
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    # the samples file holds the (filtered) answer itself, not lmms-eval's in-memory list of one
    answers = {ids[s["doc_id"]]: s["filtered_resps"] for s in samples}
    ours = our_evaluation["answers"]["pope_random"]
    assert answers == {qid: ours[qid] for qid in ids}
    labels = {
        json.loads(line)["question_id"]: json.loads(line)["label"]
        for line in (world / "pope_random.jsonl").read_text().splitlines()
    }
    from moe_llava.evaluation.pope import PopeCounts, pope_yes_no

    expected = PopeCounts.from_predictions([labels[q] for q in ids], [pope_yes_no(answers[q]) for q in ids])
    assert results["f1,none"] == pytest.approx(expected.metrics()["f1"])
    assert results["yes_ratio,none"] == pytest.approx(expected.metrics()["yes_ratio"])


def test_benchmark_deployment_runs_the_command_logs_lmms_metrics_and_files_and_tags_the_version(
    world, tracking_uri, logged_model, make_registry, model_name, tmp_path
):
    """The flow's benchmark pipeline (deployment moe-tuning/benchmark) runs `moe-llava eval benchmark`
    on a registered version: MLflow metrics and files, the version's tags, the table."""
    registry = make_registry()
    version = registry.register(
        logged_model["model_uri"], {"pope/mean_f1": 0.5}, run_id=logged_model["run_id"]
    ).version
    args = [
        "--batch-size", "3",
        "--data-root", str(world),
        "--tracking-uri", tracking_uri,
        "--lmms-python", sys.executable,
    ]  # fmt: skip
    parameters = {
        "pipeline": "benchmark",
        "model": f"models:/{model_name}@champion",
        "tasks": "shapesworld_pope_random,shapesworld_vqa_test",
        "limit": 3,
        "benchmark_dir": str(tmp_path / "bench"),
        "benchmark_args": args,
    }
    script = (
        "import json, sys; from flows.moe_tuning import moe_tuning; "
        "print('RESULT', json.dumps(moe_tuning(**json.loads(sys.argv[1]))))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Prefect's in-process server (no PREFECT_API_URL): its 20 s default is short on a busy machine
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(parameters)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert [s["name"] for s in result["steps"]] == ["benchmark"]
    out = Path(result["output_dir"])
    assert "lmms/shapesworld_pope_random/f1" in (out / "table.txt").read_text()

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = client.get_model_version(model_name, version).tags
    run = client.get_run(tags["benchmark.run_id"])
    metrics = run.data.metrics
    assert {
        "lmms/shapesworld_pope_random/f1",
        "lmms/shapesworld_pope_random/yes_ratio",
        "lmms/shapesworld_vqa_test/accuracy",
    } <= set(metrics)
    assert result["metrics"] == pytest.approx({k: metrics[k] for k in result["metrics"]})
    assert run.data.tags["registered_version"] == version and run.data.tags["tasks"].startswith("shapesworld")
    # the gate reads the version's metrics: the benchmark's are there now, beside the evaluation's
    assert registry.version_metrics(version)["lmms/shapesworld_pope_random/f1"] == pytest.approx(
        metrics["lmms/shapesworld_pope_random/f1"]
    )
    # on the version's logged model (through the benchmark run), not as version tags
    logged = client.get_logged_model(
        client.get_model_version(model_name, version).source.removeprefix("models:/")
    )
    accuracy = [m for m in logged.metrics if m.key == "lmms/shapesworld_vqa_test/accuracy"]
    assert [m.run_id for m in accuracy] == [run.info.run_id] and not [
        k for k in tags if k.startswith("metric")
    ]
    artifacts = [f.path for f in client.list_artifacts(run.info.run_id, "lmms")]
    (model_folder,) = [a for a in artifacts if client.list_artifacts(run.info.run_id, a)]
    files = [f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, model_folder)]
    assert any(f.endswith("_results.json") for f in files)
    assert any(f.endswith("_samples_shapesworld_pope_random.jsonl") for f in files)
    assert any(f.endswith("_samples_shapesworld_vqa_test.jsonl") for f in files)
    assert "lmms/metrics.json" in artifacts


def test_a_failing_task_fails_the_benchmark_command(tiny_export, world, tmp_path, capsys):
    broken = tmp_path / "world"  # the question files without their images
    broken.mkdir()
    for name in ("pope_random.jsonl", "pope_popular.jsonl", "pope_adversarial.jsonl"):
        (broken / name).write_text((world / name).read_text())
    argv = [
        "eval", "benchmark",
        "--model", str(tiny_export),
        "--tasks", "shapesworld_pope_random",
        "--limit", "2",
        "--data-root", str(broken),
        "--no-mlflow",
        "--lmms-python", sys.executable,
    ]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "benchmark failed: lmms-eval failed" in err and "shapesworld_pope_random" in err
    assert "not found" in err  # the cause, from lmms-eval's log
