"""params/<stage>.yaml: the committed files match conf/, overrides land per stage, files load standalone."""

from __future__ import annotations

import re
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
    INPUTS_FILE,
    NOT_READ,
    STAGES,
    TRACKED,
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
    written = [p.name for p in write_params(DEFAULT_OVERRIDES, out)]
    assert written == [*(f"{s}.yaml" for s in STAGES), INPUTS_FILE]
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
    assert len(changed) == 4  # new files (their headers name the overrides) ...
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


# ---------------------------------------------------------------------------------------------------
# Each stage of dvc.yaml depends on the parameters it reads, no more (the real `dvc repro` runs are in
# test_dvc_pipeline.py and tests/recipes/).
def dvc_params() -> dict[str, list[str]]:
    """The params keys dvc.yaml lists per stage (evaluate: the foreach template)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        [entry] = body["params"]
        [(file, keys)] = entry.items()
        assert file == (
            "params/${key}.yaml"
            if name == "evaluate"
            else f"params/{'stage1' if name == 'backbones' else name}.yaml"
        )
        listed[name] = keys
    return listed


def test_dvc_yaml_lists_what_each_stage_reads():
    assert dvc_params() == {stage: list(keys) for stage, keys in TRACKED.items()}


def leaves(node, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        return {leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


# who reads which file: backbones and stage 1 read stage1.yaml, each evaluation its stage's file
READERS = {
    "stage1": ("backbones", "stage1"),
    "stage2": ("stage2", "evaluate"),
    "stage3": ("stage3", "evaluate"),
}


@pytest.mark.parametrize("experiment", ["tiny_cpu", "phi2_clip336"])
def test_every_key_is_a_parameter_of_the_stage_or_says_why_not(tmp_path, experiment):
    """No key of a params file escapes: it is tracked by each stage reading the file, or NOT_READ says why."""
    write_params([f"experiment={experiment}"], tmp_path)
    for file, readers in READERS.items():
        keys = leaves(load(tmp_path / f"{file}.yaml"))
        for stage in readers:
            loose = {k for k in keys if not covered(k, TRACKED[stage]) and not covered(k, NOT_READ[stage])}
            assert not loose, f"{stage} ({file}.yaml): keys neither tracked nor explained: {sorted(loose)}"


def test_moe_evaluation_and_registry_values_are_read_by_their_stages_only():
    """What a value reaches, by the lists DVC uses: moe only stage 3, evaluation only evaluate@,
    registry and logger no stage (the registration runs in the flow after DVC)."""
    readers = {key: {s for s, keys in TRACKED.items() if covered(key, keys)} for key in (
        "moe.num_experts", "evaluation.max_new_tokens", "data.eval.pope.random", "registry.model_name",
        "logger.tracking_uri", "stage.lr", "model.language_model", "data.stages.stage3.train")}  # fmt: skip
    assert readers == {
        "moe.num_experts": {"stage3"},
        "evaluation.max_new_tokens": {"evaluate"},
        "data.eval.pope.random": {"evaluate"},
        "registry.model_name": set(),
        "logger.tracking_uri": set(),
        "stage.lr": {"stage1", "stage2", "stage3"},
        "model.language_model": {"backbones", "stage1"},
        "data.stages.stage3.train": {"stage3"},
    }


def test_inputs_name_local_files_anywhere_and_leave_hub_ids_out(tmp_path):
    """params/inputs.yaml: a real recipe's data outside the repository and a local tower are
    dependencies; a hub id is not (its code folder stands in); the evaluation's question files."""
    pope = tmp_path / "pope" / "coco_pope_random.json"
    overrides = [
        "experiment=phi2_clip336",
        f"data.root={tmp_path}/llava",
        f"model.vision_tower.name_or_path={tmp_path}/towers/clip",
        f"data.eval.pope.random={pope}",
        f"run_dir={tmp_path}/runs/phi2",
    ]
    write_params(overrides, tmp_path / "params")
    inputs = load(tmp_path / "params" / INPUTS_FILE)
    assert inputs["run_dir"] == f"{tmp_path}/runs/phi2"
    assert inputs["inputs"]["stage1"] == {
        "train": f"{tmp_path}/llava/blip_laion_cc_sbu_558k.json",
        "val": "src/moe_llava/training",
        "images": f"{tmp_path}/llava/images",
        "tokenizer": "src/moe_llava/training",  # the LM's own (a hub id)
        "vision": f"{tmp_path}/towers/clip",
        "language": "src/moe_llava/training",  # microsoft/phi-2: a hub id
        "init": "src/moe_llava/training",
    }
    assert inputs["inputs"]["stage3"]["init"] == f"{tmp_path}/runs/phi2/stage2/export"
    assert inputs["inputs"]["backbones"] == {
        k: "src/moe_llava/pretrain" for k in ("data", "images", "tokenizer")
    }
    evaluate = inputs["evaluate"]["stage3"]
    assert evaluate["model"] == f"{tmp_path}/runs/phi2/stage3/export" and evaluate["q0"] == str(pope)
    assert {evaluate[f"q{i}"] for i in range(1, 8)} == {"src/moe_llava/evaluation"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.upcycle=true", r"stage\.upcycle \(stage1\): dvc\.yaml tracks moe\.\* for stage3 only"),
        ("run_dir=data/runs", r"run_dir: .*inside data/, which data\.dvc tracks"),
    ],
)
def test_what_dvc_cannot_run_is_refused_with_the_reason(tmp_path, capsys, override, message):
    assert main(["pipeline", "params", "--out", str(tmp_path / "params"), *DEFAULT_OVERRIDES, override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "params").exists()  # nothing written
