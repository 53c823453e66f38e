"""dvc.yaml end to end: real `dvc repro` / `dvc exp run` of the three stages and both evaluations.

A git clone of the committed repository gets a tiny ShapesWorld (`dvc add data`) and parameter files
written by `moe-llava pipeline params` with the training tests' shrunk tiny_cpu preset; every path in
them is relative to the clone, where DVC runs the stage commands. The stage commands import
moe_llava from this checkout (editable install); `python` is this interpreter.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from moe_llava.cli import main
from moe_llava.pipeline.params import STAGE3_PARAMS
from tests.project import clone_overrides, clone_with_tiny_data, sh
from tests.training.faults import attempts, trained_sequence

STAGES = ("stage1", "stage2", "stage3")
ALL = ("backbones", *STAGES, "evaluate@stage2", "evaluate@stage3")
EVALUATION = ["evaluation.limit=4", "evaluation.max_new_tokens=4", "evaluation.progress=false"]


def run(*args: str, cwd: Path, timeout: float = 120) -> str:
    return sh(*args, cwd=cwd, timeout=timeout)


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def lock(clone: Path) -> dict:
    return yaml.safe_load((clone / "dvc.lock").read_text())["stages"]


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(tmp_path):
    clone = clone_with_tiny_data(tmp_path / "clone")
    overrides = [*clone_overrides(), *EVALUATION]
    assert main(["pipeline", "params", "--out", str(clone / "params"), *overrides]) == 0
    params = {s: yaml.safe_load((clone / "params" / f"{s}.yaml").read_text()) for s in STAGES}
    assert {p["run_dir"] for p in params.values()} == {"artifacts"}
    assert yaml.safe_load((clone / "params" / "inputs.yaml").read_text())["run_dir"] == "artifacts"
    assert str(tmp_path) not in "".join((clone / "params" / f"{s}.yaml").read_text() for s in STAGES)
    run("git", "add", "-A", cwd=clone)
    run("git", "commit", "-qm", "shrunk params", cwd=clone)

    # 1. the whole pipeline, in dependency order
    order = ran(run("dvc", "repro", cwd=clone, timeout=400))
    assert sorted(order) == sorted(ALL)
    assert order.index("backbones") < order.index("stage1") < order.index("stage2") < order.index("stage3")
    assert order.index("stage2") < order.index("evaluate@stage2")
    assert order.index("stage3") < order.index("evaluate@stage3")
    artifacts = clone / "artifacts"
    backbones = json.loads((artifacts / "backbones" / "metrics.json").read_text())
    assert backbones["vision/labels"] > 0 and backbones["language/train/loss"] > 0
    stage1 = yaml.safe_load((clone / "params" / "stage1.yaml").read_text())["model"]
    assert stage1["pretrained"] and stage1["vision_tower"]["name_or_path"] == "artifacts/backbones/vision"
    for stage in STAGES:
        assert (artifacts / stage / "export" / "config.json").is_file()
        assert json.loads((artifacts / stage / "metrics.json").read_text())["global_step"] == 3
    assert set(lock(clone)) == set(ALL)

    # 2. metrics: both evaluations' POPE mean F1 (and the stages' training summaries)
    metrics = json.loads(run("dvc", "metrics", "show", "--json", cwd=clone))[""]["data"]
    for stage in ("stage2", "stage3"):
        f1 = metrics[f"artifacts/{stage}/eval/metrics.json"]["data"]["pope/mean_f1"]
        assert isinstance(f1, float) and 0.0 <= f1 <= 1.0
    for stage in STAGES:
        assert metrics[f"artifacts/{stage}/metrics.json"]["data"]["global_step"] == 3

    # 3. plots: every stage's loss curve from Lightning's CSV log, x step, y train/loss
    plots = json.loads(run("dvc", "plots", "show", "--json", cwd=clone))
    assert "errors" not in plots, plots.get("errors")
    for stage in STAGES:
        path = f"artifacts/{stage}/logs/metrics.csv"
        [plot] = plots["data"][path]
        spec = json.dumps(plot["content"])
        assert '"field": "train/loss"' in spec and '"field": "step"' in spec
        shown = {(r["step"], r["train/loss"]) for r in plot["content"]["data"]["values"] if r["train/loss"]}
        with (clone / path).open() as f:
            logged = {(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}
        assert shown == logged and {step for step, _ in logged} == {"0", "1", "2"}

    # 4. nothing changed: nothing runs
    again = run("dvc", "repro", cwd=clone)
    assert ran(again) == [] and "Data and pipelines are up to date" in again
    for stage in ALL:
        assert f"Stage '{stage}' didn't change" in again
    run("git", "add", "dvc.lock", cwd=clone)
    run("git", "commit", "-qm", "pipeline ran", cwd=clone)

    # 5. registry and tracking values, regenerated into every params file as the flow does: no
    # stage reads them (the registration runs after DVC), nothing reruns
    def regenerate(*extra: str) -> None:
        assert main(["pipeline", "params", "--out", str(clone / "params"), *overrides, *extra]) == 0

    regenerate("registry.model_name=other", "registry.gate.min_margin=0.5", "logger.log_system_metrics=true")
    assert ran(run("dvc", "repro", cwd=clone)) == []
    # 6. an evaluation value and a moe value, regenerated into every params file as the flow does,
    # then a stage-3 value in a DVC experiment: both evaluations rerun (and no training for the
    # evaluation value); moe, read by stage 3 only, and the stage-3 value rerun stage 3 alone
    regenerate("evaluation.max_new_tokens=3", "moe.router_aux_loss_coef=0.02")
    params = {s: yaml.safe_load((clone / "params" / f"{s}.yaml").read_text()) for s in STAGES}
    run("git", "add", "-A", cwd=clone)
    run("git", "commit", "-qm", "evaluation and moe changed", cwd=clone)
    before = lock(clone)
    experiment = run("dvc", "exp", "run", "-S", f"{STAGE3_PARAMS}:stage.lr=0.0007", cwd=clone, timeout=300)
    assert sorted(ran(experiment)) == ["evaluate@stage2", "evaluate@stage3", "stage3"]
    for stage in ("backbones", "stage1", "stage2"):
        assert f"Stage '{stage}' didn't change" in experiment
    # -S rewrites the file through OmegaConf.to_object: the same values (nulls written as empty
    # values, the ${...} interpolation in hydra.run.dir resolved), stage.lr changed, nothing else
    rewritten = yaml.safe_load((clone / STAGE3_PARAMS).read_text())
    assert rewritten["hydra"]["run"]["dir"] in ("${run_dir}/${stage.name}/hydra", "artifacts/stage3/hydra")
    stage3 = params["stage3"]
    assert rewritten == {**stage3, "stage": {**stage3["stage"], "lr": 0.0007}, "hydra": rewritten["hydra"]}
    after = lock(clone)
    assert after["stage3"]["params"][str(STAGE3_PARAMS)]["stage"]["lr"] == 0.0007
    assert after["stage3"]["params"][str(STAGE3_PARAMS)]["moe"]["router_aux_loss_coef"] == 0.02
    assert after["evaluate@stage2"]["params"]["params/stage2.yaml"]["evaluation"]["max_new_tokens"] == 3
    for stage in ("backbones", "stage1", "stage2"):
        assert after[stage] == before[stage]
    assert after["stage3"]["outs"] != before["stage3"]["outs"]  # retrained: new weights
    status = run("git", "status", "--porcelain", cwd=clone)
    assert sorted(line[3:] for line in status.splitlines()) == ["dvc.lock", str(STAGE3_PARAMS)]

    # 7. stage 3 killed (SIGKILL at step 2, before its checkpoint), then `dvc repro` again: it resumes
    # from the step-1 checkpoint in the same MLflow run and trains each sample once
    params_file = clone / STAGE3_PARAMS
    stage3 = yaml.safe_load(params_file.read_text())
    faults = "tests.training.faults"
    stage3["callbacks"]["kill"] = {"_target_": f"{faults}.KillAt", "step": 2, "marker": str(tmp_path / "k")}
    stage3["callbacks"]["log"] = {"_target_": f"{faults}.BatchLog", "path": str(tmp_path / "b.jsonl")}
    params_file.write_text(yaml.safe_dump(stage3, sort_keys=False))
    killed = sh("dvc", "repro", "stage3", cwd=clone, timeout=300, ok=False)
    assert "failed to reproduce" in killed and (tmp_path / "k").exists()
    resumed = run("dvc", "repro", "stage3", cwd=clone, timeout=300)
    assert ran(resumed) == ["stage3"]
    result = json.loads((artifacts / "stage3" / "metrics.json").read_text())
    assert result["resumed"] is True and result["global_step"] == 3
    trained = trained_sequence(*attempts(tmp_path / "b.jsonl"))
    ids = [i for batch in trained for i in batch["ids"]]
    assert len(trained) == 3 * 2 and len(ids) == len(set(ids)) == 3 * 8, "6 micro-batches, no sample twice"
