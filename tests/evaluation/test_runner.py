"""The evaluation command end to end on tiny exports: outputs, metrics.json, the MLflow run, errors."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from omegaconf import OmegaConf

from moe_llava.cli import main
from moe_llava.data.shapesworld.pope import RELATIONS
from moe_llava.errors import ConfigError
from moe_llava.evaluation import EvalFileError
from moe_llava.evaluation.runner import run_evaluation
from tests.evaluation.conftest import shrunk_overrides, write_jsonl

POPE = ("random", "popular", "adversarial")
LIMIT = 4


@pytest.fixture
def clean_hydra():
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()  # an in-process @hydra.main leaves Hydra initialised


def training_runs(tmp_path, stage_dir):
    """A pipeline run with a finished stage-3 training run nested under it, as the training leaves them."""
    import mlflow

    from moe_llava.tracking import ensure_experiment

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = ensure_experiment("tiny-cpu", {"artifact_location": str(tmp_path / "mlartifacts")})
    with (
        mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent,
        mlflow.start_run(experiment_id=experiment_id, run_name="stage3", nested=True) as training,
    ):
        pass
    (stage_dir / "mlflow_run_id").write_text(training.info.run_id)
    return parent.info.run_id, training.info.run_id


def test_eval_command_on_an_moe_export(moe_export, shapesworld, tmp_path, monkeypatch, clean_hydra):
    from mlflow.tracking import MlflowClient

    stage_dir = moe_export.parent
    parent_id, training_id = training_runs(tmp_path, stage_dir)
    overrides = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage3",
        f"evaluation.limit={LIMIT}",
        "evaluation.batch_size=3",  # a short last batch, left padding
        "evaluation.max_new_tokens=3",
        "evaluation.progress=false",
    ]
    monkeypatch.setattr(sys, "argv", ["moe-llava"])
    assert main(["eval", "run", *overrides]) == 0

    out = stage_dir / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave nothing
    required = {
        *(f"pope/{s}/{m}" for s in POPE for m in ("accuracy", "precision", "recall", "f1", "yes_ratio")),
        "pope/mean_f1",
        "vqa/val/accuracy",
        "vqa/test/accuracy",
        "eval/wall_time_s",
        "eval/num_missing",
        "eval/num_questions",
        *(
            f"moe/layer{i}/{k}"
            for i in (0, 2)
            for k in ("expert0_load", "image_expert3_load", "text_expert1_load", "entropy")
        ),
    }
    assert required <= set(metrics)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["pope/mean_f1"] == pytest.approx(sum(metrics[f"pope/{s}/f1"] for s in POPE) / 3)
    assert metrics["eval/num_questions"] == 5 * LIMIT and metrics["eval/num_missing"] == 0
    assert any(k.startswith("vqa/test/") and k.count("/") == 3 for k in metrics)  # per category
    # answers grouped by how the asked object relates to the scene (data.eval.pope_groups)
    scores = json.loads((out / "scores.json").read_text())
    for s in POPE:
        groups = scores["benchmarks"][f"pope_{s}"]["groups"]
        assert set(groups) <= set(RELATIONS) and "present" in groups
        assert sum(g["num_questions"] for g in groups.values()) == LIMIT
        weighted = sum(g["yes_ratio"] * g["num_questions"] for g in groups.values()) / LIMIT
        assert metrics[f"pope/{s}/yes_ratio"] == pytest.approx(weighted)
        assert all(metrics[f"pope/{s}/yes_ratio/{g}"] == groups[g]["yes_ratio"] for g in groups)
    assert "pope/yes_ratio/present" in metrics

    for name in [*(f"pope_{s}" for s in POPE), "vqa_val", "vqa_test"]:
        lines = [json.loads(line) for line in (out / "answers" / f"{name}.jsonl").read_text().splitlines()]
        source = shapesworld / f"{name}.jsonl"
        expected_ids = [json.loads(line)["question_id"] for line in source.read_text().splitlines()[:LIMIT]]
        assert [a["question_id"] for a in lines] == expected_ids
        assert all(isinstance(a["text"], str) for a in lines)

    load = json.loads((out / "expert_load.json").read_text())
    num_image_tokens = 16  # 32 px images, 8 px patches
    for layer in load["layers"]:
        assert layer["tokens"]["image"] == 5 * LIMIT * num_image_tokens
        assert sum(layer["top1"]["image"]) == layer["tokens"]["image"]
    assert (out / "expert_load.png").read_bytes()[:4] == b"\x89PNG"

    # the answers file scores the same through `moe-llava eval pope-score` (unanswered questions listed)
    assert (
        main(
            [
                "eval",
                "pope-score",
                "--questions",
                str(shapesworld / "pope_random.jsonl"),
                "--answers",
                str(out / "answers" / "pope_random.jsonl"),
            ]
        )
        == 0
    )

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (out / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.info.run_name == "eval-stage3" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["training_run_id"] == training_id
    assert run.info.experiment_id == client.get_run(training_id).info.experiment_id
    assert run.data.tags["model_dir"] == str(moe_export.resolve())
    assert "git_commit" in run.data.tags and json.loads(run.data.tags["moe"])["num_experts"] == 4
    assert run.data.metrics == pytest.approx(metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/metrics.json", "eval/expert_load.png", "eval/expert_load.json", "eval/answers"} <= artifacts
    assert run.data.params["evaluation.limit"] == str(LIMIT)


def test_dense_export_official_pope_format(compose_stage, dense_export, shapesworld, tmp_path, caplog):
    """A dense model: no expert load (said so). POPE questions in the public format (integer ids, no
    conversations) are prompted from `text` with the configured suffix."""
    official = []
    for line in (shapesworld / "pope_random.jsonl").read_text().splitlines()[:5]:
        record = json.loads(line)
        official.append(
            {
                "question_id": len(official) + 1,
                "image": record["image"],
                "text": record["text"],
                "label": record["label"],
            }
        )
    questions = write_jsonl(tmp_path / "coco_pope_random.json", official)
    cfg = compose_stage(
        "stage3",
        f"evaluation.model_dir={dense_export}",
        f"evaluation.output_dir={tmp_path}/dense_eval",
        f"data.eval.pope.random={questions}",
        "data.eval.vqa.val=null",  # as a real dataset without VQA files: the default evaluates POPE only
        "data.eval.vqa.test=null",
        "evaluation.pope_splits=[random]",
        "evaluation.max_new_tokens=2",
        "evaluation.mlflow=false",
        "evaluation.progress=false",
        "evaluation.prompt_suffix='Answer the question using a single word or phrase.'",
    )
    # the public format has no `object`: ShapesWorld's grouping of answers says so before the model loads
    with pytest.raises(EvalFileError, match=r"coco_pope_random\.json: line 1: .*'object'.*pope_groups.*null"):
        run_evaluation(cfg)
    OmegaConf.update(cfg, "data.eval.pope_groups", None)
    with caplog.at_level(logging.INFO, logger="moe_llava.evaluation.runner"):
        metrics = run_evaluation(cfg)
    assert "expert-load analysis skipped: dense model" in caplog.text
    out = tmp_path / "dense_eval"
    assert not (out / "expert_load.json").exists() and not (out / "mlflow_run_id").exists()
    assert json.loads((out / "scores.json").read_text())["expert_load"] == "skipped: dense model"
    assert not any(k.startswith("moe/") for k in metrics)
    assert metrics["pope/random/num_questions"] == 5 and "pope/mean_f1" in metrics
    answers = [json.loads(line) for line in (out / "answers" / "pope_random.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [
        1,
        2,
        3,
        4,
        5,
    ]  # as the file has them (LLaVA's POPE script)
    assert answers[0]["prompt"].endswith("?\nAnswer the question using a single word or phrase.")


def test_bad_inputs_fail_with_clear_errors(compose_stage, dense_export, shapesworld, tmp_path):
    base = [f"evaluation.model_dir={dense_export}", "evaluation.mlflow=false", "evaluation.progress=false"]
    with pytest.raises(ConfigError, match=r"evaluation\.pope_splits: 'nope' has no file in data\.eval\.pope"):
        run_evaluation(compose_stage("stage3", *base, "evaluation.pope_splits=[nope]"))
    with pytest.raises(ConfigError, match=r"evaluation\.benchmarks: must be null .* or a non-empty subset"):
        run_evaluation(compose_stage("stage3", *base, "evaluation.benchmarks=[mmlu]"))
    with pytest.raises(ConfigError, match=r"data\.eval\.pope_groups: .*nowhere\.jsonl"):
        run_evaluation(
            compose_stage("stage3", *base, f"data.eval.pope_groups.scenes={tmp_path}/nowhere.jsonl")
        )
    with pytest.raises(ConfigError, match=r"evaluation\.model_dir: .* is not a model export"):
        run_evaluation(compose_stage("stage3", f"evaluation.model_dir={tmp_path}/nothing"))

    records = [json.loads(line) for line in (shapesworld / "pope_random.jsonl").read_text().splitlines()[:3]]
    records[2]["image"] = "test/missing.png"
    bad = write_jsonl(tmp_path / "bad_pope.jsonl", records)
    cfg = compose_stage(
        "stage3",
        *base,
        f"data.eval.pope.random={bad}",
        "evaluation.benchmarks=[pope]",
        "evaluation.pope_splits=[random]",
    )
    with pytest.raises(
        EvalFileError,
        match=r"bad_pope\.jsonl: line 3: field 'image': question_id 'pope-random-00002': .*missing\.png",
    ):
        run_evaluation(cfg)


def test_a_real_recipe_evaluates_what_is_configured_and_hints_work_in_hydra(tmp_path):
    """llava_json has POPE splits (null) and no VQA set: the default runs the configured kinds only;
    a missing kind's hint is a Hydra override that works as printed (`+` for a key not there yet)."""
    from hydra.errors import ConfigCompositionException

    from moe_llava.config import compose_config
    from moe_llava.evaluation.runner import plan_benchmarks

    pope = write_jsonl(
        tmp_path / "coco_pope_random.json",
        [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "no"}],
    )
    recipe = ["experiment=phi2_clip336", "stage=stage3"]
    with pytest.raises(ConfigError) as nothing:
        plan_benchmarks(compose_config(recipe))
    assert str(nothing.value) == (
        "data.eval: no question file is configured (data 'llava_json'): set data.eval.pope.random=FILE (POPE) "
        "or +data.eval.vqa.test=FILE (VQA)"
    )
    plan = plan_benchmarks(compose_config([*recipe, f"data.eval.pope.random={pope}"]))
    assert [b.key for b in plan] == ["pope_random"]  # not VQA, which has no file
    with pytest.raises(
        ConfigError, match=r"data\.eval\.vqa: no VQA question file .* set \+data\.eval\.vqa\.test=FILE"
    ):
        plan_benchmarks(
            compose_config([*recipe, f"data.eval.pope.random={pope}", "evaluation.benchmarks=[pope,vqa]"])
        )
    # the hints, as printed, compose; without the `+` Hydra refuses
    vqa = write_jsonl(
        tmp_path / "vqa.jsonl", [{"question_id": 7, "image": "a.png", "text": "Colour?", "answer": "red"}]
    )
    assert [b.key for b in plan_benchmarks(compose_config([*recipe, f"+data.eval.vqa.test={vqa}"]))] == [
        "vqa_test"
    ]
    with pytest.raises(ConfigCompositionException):
        compose_config([*recipe, f"data.eval.vqa.test={vqa}"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 0}, "evaluation.batch_size: must be a positive integer, got 0"),
        ({"max_new_tokens": True}, "evaluation.max_new_tokens: must be a positive integer, got True"),
        ({"limit": -1}, "evaluation.limit: must be a positive integer or null, got -1"),
        (
            {"dtype": "int8"},
            "evaluation.dtype: must be one of ['float32', 'bfloat16', 'float16'], got 'int8'",
        ),
        ({"device": "tpu:x"}, "evaluation.device: must be auto, cpu, cuda or cuda:N, got 'tpu:x'"),
        ({"benchmarks": []}, "evaluation.benchmarks: must be null (every benchmark with a question file)"),
        ({"pope_splits": 3}, "evaluation.pope_splits: must be a list of names or null, got 3"),
        ({"batch_sise": 4}, "evaluation: unknown keys ['batch_sise']"),
    ],
)
def test_evaluation_config_errors_name_the_key(values, message):
    from moe_llava.evaluation.runner import EvalConfig

    with pytest.raises(ConfigError) as err:
        EvalConfig.of(values)
    assert str(err.value).startswith(message)


def test_evaluation_config_defaults_are_the_config_group():
    from moe_llava.evaluation.runner import EvalConfig
    from moe_llava.paths import CONF_DIR

    group = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "evaluation" / "default.yaml"))
    assert EvalConfig.of(group) == EvalConfig() and EvalConfig.of({"benchmarks": "pope"}).benchmarks == [
        "pope"
    ]
