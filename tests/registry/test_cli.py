"""`moe-llava registry register|promote|rollback|show` as a user runs them, on a temp SQLite store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from moe_llava.cli import main
from moe_llava.registry.settings import load_settings


def test_settings_come_from_the_composed_config_then_flags(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings()
    assert settings.model_name == "moe-llava"
    assert (settings.gate.metric, settings.gate.direction, settings.gate.min_margin) == (
        "pope/mean_f1",
        "maximize",
        0.0,
    )
    assert settings.resolved_tracking_uri().startswith(
        "sqlite:///"
    ) and settings.resolved_tracking_uri().endswith("/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert load_settings().resolved_tracking_uri() == f"sqlite:///{tmp_path}/env.db"  # as in training
    overridden = load_settings(
        ["registry.gate.metric=vqa/test/accuracy", "registry.gate.min_margin=0.02"], model_name="other"
    )
    assert overridden.gate.metric == "vqa/test/accuracy" and overridden.gate.min_margin == 0.02
    assert overridden.model_name == "other"
    flags = load_settings(["registry.gate.metric=vqa/test/accuracy"], gate_metric="pope/random/f1")
    assert flags.gate.metric == "pope/random/f1"  # a flag beats the config


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_promote_rollback_show_from_the_command_line(
    capsys, tmp_path, tiny_export, tracking_uri, model_name, logged_model
):
    common = ["--tracking-uri", tracking_uri, "--model-name", model_name]
    overrides = [
        "-o",
        f"logger.artifact_location={tmp_path}/mlartifacts",
        "-o",
        "experiment_name=registry-cli",
    ]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"pope/mean_f1": 0.71, "pope/random/f1": 0.74, "vqa/test/accuracy": 0.3}))
    config = tmp_path / "config.yaml"
    config.write_text("experiment_name: registry-cli\nstage:\n  name: stage3\n")

    code, out, _ = _run(
        capsys,
        "registry",
        "register",
        "--model-dir",
        str(tiny_export),
        "--metrics",
        str(metrics),
        "--config",
        str(config),
        "--json-out",
        str(tmp_path / "out" / "registration.json"),
        *common,
        *overrides,
    )
    assert code == 0
    first = json.loads(out)
    assert json.loads((tmp_path / "out" / "registration.json").read_text()) == first  # for scripts
    assert first["version"] == "1" and first["champion"] and first["aliases"] == ["champion"]
    assert first["decision"]["promote"] and first["decision"]["value"] == 0.71

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version(model_name, "1")
    assert len(mv.tags["git_commit"]) == 40 and mv.tags["data_hash"]
    lock = hashlib.sha256(Path("requirements.lock").read_bytes()).hexdigest()  # the repository's lock
    assert mv.tags["lock_hash"] == lock
    # the tags a person reads: from the config, and the export's MoE layout (a stage-2 export: dense)
    assert (mv.tags["stage"], mv.tags["recipe"], mv.tags["moe"]) == ("stage3", "registry-cli", "dense")
    assert "config" not in mv.tags and not [k for k in mv.tags if k.startswith("metric")]
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics}["pope/random/f1"] == 0.74
    run = client.get_run(mv.run_id)
    assert mlflow.artifacts.load_text(f"runs:/{mv.run_id}/registry/config.yaml") == config.read_text()
    assert run.info.run_name == "register" and run.info.status == "FINISHED"
    assert run.data.metrics["pope/mean_f1"] == 0.71 and run.data.tags["registered_version"] == "1"
    assert run.data.tags["lock_hash"] == lock and run.data.tags["git_commit"] == mv.tags["git_commit"]
    assert mlflow.get_experiment(run.info.experiment_id).name == "registry-cli"
    assert mlflow.get_experiment(run.info.experiment_id).artifact_location.startswith(
        (tmp_path / "").as_uri()
    )

    # A worse model, logged into an existing run (e.g. the stage's): stays challenger.
    metrics.write_text(json.dumps({"pope/mean_f1": 0.65}))
    code, out, _ = _run(
        capsys,
        "registry",
        "register",
        "--model-dir",
        str(tiny_export),
        "--metrics",
        str(metrics),
        "--run-id",
        logged_model["run_id"],
        *common,
        *overrides,
    )
    second = json.loads(out)
    assert code == 0 and second["version"] == "2" and second["aliases"] == ["challenger"]
    assert "worse" in second["decision"]["reason"]
    assert client.get_model_version(model_name, "2").run_id == logged_model["run_id"]

    code, out, _ = _run(capsys, "registry", "show", *common)
    assert code == 0
    assert f"registered model '{model_name}': champion v1, challenger v2" in out
    assert "0.7100" in out and "0.6500" in out

    code, out, _ = _run(capsys, "registry", "promote", "2", "--reason", "wins on the held-out set", *common)
    assert code == 0 and json.loads(out)["champion"] == "2"
    assert client.get_model_version(model_name, "2").tags["promotion_reason"] == "wins on the held-out set"

    code, out, _ = _run(capsys, "registry", "rollback", "--reason", "latency regression", *common)
    assert code == 0 and json.loads(out)["champion"] == "1"

    code, _, err = _run(capsys, "registry", "rollback", *common)
    assert code == 2 and "moe-llava: error: nothing to roll back to: v1" in err
    assert str(client.get_registered_model(model_name).aliases["champion"]) == "1"

    code, out, _ = _run(capsys, "registry", "show", "--json", *common)
    info = json.loads(out)
    assert info["aliases"] == {"champion": "1"} and info["champion_history"] == ["1"]

    code, _, err = _run(capsys, "registry", "promote", "7", *common)
    assert code == 2 and "has no version '7'" in err


def test_register_rejects_a_folder_that_is_not_an_export(capsys, tmp_path, tracking_uri):
    (tmp_path / "metrics.json").write_text("{}")
    register = (
        "registry", "register", "--model-dir", str(tmp_path),
        "--metrics", str(tmp_path / "metrics.json"), "--tracking-uri", tracking_uri,
    )  # fmt: skip
    code, _, err = _run(capsys, *register)
    assert code == 2 and "is not a model export" in err
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')  # some other model's folder
    code, _, err = _run(capsys, *register)
    assert code == 2 and f"{tmp_path / 'config.json'}: model_type 'gpt2' is not a MoE-LLaVA model" in err


@pytest.mark.parametrize("argv", [["registry", "--help"], ["chat", "--help"]])
def test_groups_are_wired_into_the_console_script(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: moe-llava" in capsys.readouterr().out
