"""params/<stage>.yaml: the committed files match conf/, overrides land per stage, files load standalone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_llava.cli import main
from moe_llava.paths import CONF_DIR
from moe_llava.pipeline.params import (
    DEFAULT_OVERRIDES,
    STAGES,
    compose_stage,
    stale_params,
    write_params,
)

REPO = Path(__file__).resolve().parents[2]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def differences(a, b, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts (missing keys included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {
            diff
            for key in a.keys() | b.keys()
            for diff in differences(a.get(key, KeyError), b.get(key, KeyError), f"{prefix}{key}.")
        }
    return set() if a == b else {prefix.rstrip(".")}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory) -> dict[str, dict]:
    """The three files written with the default overrides, parsed."""
    out = tmp_path_factory.mktemp("default_params")
    assert [p.name for p in write_params(DEFAULT_OVERRIDES, out)] == [f"{s}.yaml" for s in STAGES]
    return {stage: load(out / f"{stage}.yaml") for stage in STAGES}


def test_committed_params_are_in_sync_with_conf(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the defaults are params/ of the project being run: the current directory
    assert stale_params() == []
    assert main(["pipeline", "params", "--check"]) == 0
    assert capsys.readouterr().err == ""


def test_committed_params_are_the_default_overrides(defaults):
    for stage in STAGES:
        assert load(REPO / "params" / f"{stage}.yaml") == defaults[stage]
        assert defaults[stage]["stage"]["name"] == stage
        assert "stage_overrides" not in defaults[stage]  # Hydra merged the stage preset into `stage`
    assert defaults["stage3"]["stage"]["max_steps"] == 200  # conf/stage_preset/tiny_cpu/stage3.yaml


def test_explicit_stage_value_changes_every_stage_and_nothing_else(tmp_path, defaults):
    """`stage.lr=...` on the command line wins over every stage's preset (Hydra's own precedence)."""
    assert main(["pipeline", "params", "--out", str(tmp_path), *DEFAULT_OVERRIDES, "stage.lr=0.123"]) == 0
    for stage in STAGES:
        written = load(tmp_path / f"{stage}.yaml")
        assert written["stage"]["lr"] == 0.123
        assert differences(written, defaults[stage]) == {"stage.lr"}


def test_stage3_preset_value_changes_stage3_only(tmp_path, defaults, monkeypatch):
    """A stage-3-only value changes params/stage3.yaml only: DVC reruns stage 3 and nothing before it."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    preset = conf / "stage_preset" / "tiny_cpu" / "stage3.yaml"
    preset.write_text(preset.read_text().replace("lr: 5.0e-4\n", "lr: 0.123\n"))
    monkeypatch.setattr("moe_llava.config.CONF_DIR", conf)
    tmp_path = tmp_path / "params"
    overrides = list(DEFAULT_OVERRIDES)
    changed = write_params(overrides, tmp_path)
    assert len(changed) == 3  # new files (their headers name the overrides) ...
    for stage in ("stage1", "stage2"):  # ... but the values of stages 1 and 2 are untouched
        assert load(tmp_path / f"{stage}.yaml") == defaults[stage]
    stage3 = load(tmp_path / "stage3.yaml")
    assert differences(stage3, defaults["stage3"]) == {"stage.lr"}
    assert stage3["stage"]["lr"] == 0.123 != defaults["stage3"]["stage"]["lr"]
    # and rewriting with the same overrides changes nothing
    assert write_params(overrides, tmp_path) == []
    assert stale_params(overrides, tmp_path) == []


def test_check_names_the_edited_file(tmp_path, capsys):
    write_params(DEFAULT_OVERRIDES, tmp_path)
    assert main(["pipeline", "params", "--check", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "stage2.yaml"
    before = edited.read_text()
    edited.write_text(before.replace("lr: 0.002\n", "lr: 0.003\n", 1))
    assert edited.read_text() != before
    capsys.readouterr()

    assert stale_params(DEFAULT_OVERRIDES, tmp_path) == [edited]
    assert main(["pipeline", "params", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(edited) in err
    assert "stage1.yaml" not in err and "stage3.yaml" not in err
    assert edited.read_text() != before  # --check writes nothing

    (tmp_path / "stage1.yaml").unlink()  # a missing file is stale too
    assert main(["pipeline", "params", "--check", "--out", str(tmp_path)]) == 1
    assert "stage1.yaml" in capsys.readouterr().err

    assert main(["pipeline", "params", "--out", str(tmp_path)]) == 0  # regenerating repairs both
    assert edited.read_text() == before
    assert main(["pipeline", "params", "--check", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize("stage", STAGES)
def test_each_file_is_a_standalone_hydra_config(tmp_path, stage):
    """What `python -m moe_llava.train --config-dir params --config-name <stage>` composes."""
    overrides = [*DEFAULT_OVERRIDES, "stage.weight_decay=0.01", "stage.lr=0.123"]
    write_params(overrides, tmp_path)
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        loaded = compose(stage)
    expected = compose_stage(stage, overrides)
    assert loaded.stage == expected.stage
    assert loaded.stage.lr == 0.123 and loaded.stage.weight_decay == 0.01
    assert OmegaConf.to_container(loaded) == OmegaConf.to_container(expected)
