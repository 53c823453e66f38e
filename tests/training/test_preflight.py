"""Everything a stage can fail on is found before its model loads and before its MLflow run starts,
and reported as one line with exit 2 (``python -m moe_llava.train``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_llava.errors import CheckpointError, ConfigError, RejectedFractionError
from moe_llava.training import run as run_module
from moe_llava.training.run import run_stage
from tests.training.conftest import shrunk_overrides


class Loaded(Exception):
    """Raised where the model would load: a check that comes later ran too late."""


@pytest.fixture
def no_model_no_run(monkeypatch):
    """Fail the test if a stage gets as far as loading its model or starting its MLflow run."""

    def refuse(*args, **kwargs):
        raise Loaded("the model was loaded (or the MLflow run started) before the error")

    monkeypatch.setattr(run_module, "load_model_and_processors", refuse)
    monkeypatch.setattr(run_module, "start_stage_run", refuse)


def bad_manifest(shapesworld: Path, tmp_path: Path, bad: int) -> Path:
    """The stage-2 training manifest with ``bad`` records pointing at missing images."""
    records = json.loads((shapesworld / "instruct_train.json").read_text())
    for record in records[:bad]:
        record["image"] = "train/missing.png"
    path = tmp_path / "bad_train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["trainer=deepspeed_stage_2", "trainer.accelerator=cpu", "trainer.precision=32-true"], ConfigError, r"trainer\.strategy: .*DeepSpeedStrategy cannot be used here: .*DeepSpeed installed"),
        (["trainer.accelerator=gpu"], ConfigError, r"trainer\.accelerator: gpu, but no CUDA GPU is visible"),
        (["model.pretrained=true", "model.vision_tower.name_or_path=/nowhere/clip"], ConfigError,
         r"model\.vision_tower\.name_or_path: /nowhere/clip does not exist"),
    ],
    ids=["deepspeed-missing", "no-gpu", "missing-checkpoint"],
)  # fmt: skip
def test_environment_and_sources_are_checked_before_the_model_loads(
    compose_stage, no_model_no_run, overrides, error, match
):
    if "gpu" in str(overrides) and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible here")
    if "deepspeed" in str(overrides) and __import__("importlib").util.find_spec("deepspeed"):
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(error, match=match):
        run_stage(compose_stage("stage1", *overrides))


def test_a_bad_init_from_is_a_checkpoint_error_before_the_model_loads(
    compose_stage, dense_export, tmp_path, no_model_no_run
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((dense_export / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match=r"broken/model\.safetensors: not a readable safetensors file"):
        run_stage(compose_stage("stage3", f"init_from={broken}"))


def test_the_rejected_fraction_stops_the_stage_before_the_model_loads(
    compose_stage, shapesworld, dense_export, tmp_path, no_model_no_run
):
    manifest = bad_manifest(shapesworld, tmp_path, bad=10)
    cfg = compose_stage("stage3", f"init_from={dense_export}", f"data.stages.stage3.train={manifest}")
    with pytest.raises(
        RejectedFractionError, match=r"records rejected .* see .*stage3/data/train/quarantine\.jsonl"
    ):
        run_stage(cfg)
    quarantine = tmp_path / "artifacts" / "stage3" / "data" / "train" / "quarantine.jsonl"
    assert len(quarantine.read_text().splitlines()) == 10  # written, for inspection
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, not even the store


def test_data_errors_are_one_line_and_exit_2_with_no_mlflow_run(shapesworld, dense_export, tmp_path):
    """The command-line view of the same: a 9% bad mix fails in seconds, not after loading the model."""
    manifest = bad_manifest(shapesworld, tmp_path, bad=10)
    overrides = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage3",
        f"init_from={dense_export}",
        f"data.stages.stage3.train={manifest}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_llava.train", *overrides],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("moe-llava train:")]
    assert "Traceback" not in proc.stderr and "records rejected" in line and "quarantine.jsonl" in line
    assert not (tmp_path / "mlflow.db").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "moe_llava.train", *overrides[:-1], f"init_from={tmp_path}"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"moe-llava train: config error: init_from: {tmp_path} is not a save_pretrained export" in proc.stderr
    )


def test_data_is_prepared_again_when_its_policy_changes(compose_stage, dense_export, shapesworld, tmp_path):
    """The prepared manifest is reused only for the same source and the same settings."""
    from moe_llava.training.preflight import preflight
    from moe_llava.training.run import stage_paths

    cfg = run_module.resolved(compose_stage("stage3", f"init_from={dense_export}"))
    paths = stage_paths(cfg)
    preflight(cfg, paths["init"], paths["data"], prepare_data=True)
    stamp = paths["data"] / "train" / "source.json"
    first = json.loads(stamp.read_text())
    assert first["settings"]["overlength"] == "reject"
    cfg.data.overlength = "truncate_turns"
    preflight(cfg, paths["init"], paths["data"], prepare_data=True)
    assert json.loads(stamp.read_text())["settings"]["overlength"] == "truncate_turns"
