"""The backbone step: a vision tower and an LM pretrained on the training split, loaded by stage 1
through the recipe's real ``from_pretrained`` path."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from moe_llava.config import resolved
from moe_llava.pretrain import run_backbones
from moe_llava.pretrain.language import text_samples
from moe_llava.pretrain.vision import read_annotations
from moe_llava.training import run_stage


def test_backbones_are_pretrained_saved_and_loaded_by_stage1(compose_stage, tmp_path):
    cfg = compose_stage("stage1", "model.pretrained=true")
    metrics = run_backbones(cfg)
    out = tmp_path / "artifacts" / "backbones"
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["vision/labels"] > 10 and 0.0 <= metrics["vision/val/presence_f1"] <= 1.0
    assert metrics["language/train/loss"] > 0 and metrics["language/train_samples"] > 48
    for part, files in (
        ("vision", ["model.safetensors", "preprocessor_config.json"]),
        ("language", ["model.safetensors", "tokenizer.json"]),
    ):
        assert all((out / part / name).is_file() for name in files), part
        assert json.loads((out / part / "config.json").read_text())["model_type"] == (
            "clip_vision_model" if part == "vision" else "llama"
        )
        assert (out / "logs" / part / "metrics.csv").is_file()
    # One MLflow run, ended FINISHED, holding the step's metrics; a failing step's run ends FAILED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (out / "mlflow_run_id").read_text()
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name == "backbones"
    assert finished.data.metrics["vision/val/presence_f1"] == pytest.approx(metrics["vision/val/presence_f1"])
    broken = compose_stage("stage1", "model.pretrained=true", "backbones.vision.train=no_such.jsonl")
    with pytest.raises(Exception, match=r"no_such\.jsonl"):
        run_backbones(broken)
    assert client.get_run((out / "mlflow_run_id").read_text()).info.status == "FAILED"
    # The object head is not part of the saved tower.
    vision = load_file(out / "vision" / "model.safetensors")
    assert not any("classifier" in key for key in vision)

    # Stage 1 loads both through from_pretrained; it trains only the projector, so the towers it
    # exports are exactly the pretrained ones.
    stage1 = resolved(cfg)
    assert stage1.model.pretrained and stage1.model.vision_tower.name_or_path == str(out / "vision")
    run_stage(compose_stage("stage1", "model.pretrained=true", "stage.max_steps=1"))
    exported = load_file(tmp_path / "artifacts" / "stage1" / "export" / "model.safetensors")
    language = load_file(out / "language" / "model.safetensors")
    for saved, prefix in ((vision, "vision_tower."), (language, "language_model.")):
        key = next(
            k
            for k in saved
            if k.endswith("layers.0.mlp.fc1.weight") or k.endswith("layers.0.mlp.up_proj.weight")
        )
        assert torch.equal(exported[prefix + key], saved[key]), key


def test_a_real_recipe_has_no_backbone_step_and_the_step_is_a_recorded_no_op(tmp_path):
    from hydra import compose, initialize_config_dir

    from moe_llava.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=phi2_clip336", f"run_dir={tmp_path}/artifacts"])
    assert cfg.backbones is None
    assert run_backbones(cfg) == {}
    assert json.loads((tmp_path / "artifacts" / "backbones" / "metrics.json").read_text()) == {
        "pretrained": False
    }


def test_bad_annotation_names_file_line_and_field(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "annotations.jsonl"
    path.write_text('{"image": "a.png", "objects": [{"name": "red circle"}]}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:2 \(record 1\).*'objects'"):
        read_annotations(path, tmp_path / "images")
    path.write_text('{"image": "../escape.png", "objects": []}\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:1 \(record 0\): field 'image'"):
        read_annotations(path, tmp_path / "images")
    path.write_text('{"image": "a.png", "objects": [}\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:1 \(record 0\): invalid JSON"):
        read_annotations(path, tmp_path / "images")


def test_lm_text_drops_image_placeholders_and_names_bad_records(shapesworld, tmp_path):
    from moe_llava.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(shapesworld / "tokenizer")
    samples = text_samples(shapesworld / "instruct_train.json", "phi", tokenizer, 256)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert samples and all(image_id not in s.tolist() for s in samples)
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                {"id": "x"},
            ]
        )
    )
    with pytest.raises(ValueError, match=r"bad.json:\d+ \(record 1\): field 'conversations'"):
        text_samples(bad, "phi", tokenizer, 256)


def test_backbone_config_is_the_embedded_default_only():
    from hydra import compose, initialize_config_dir

    from moe_llava.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tiny = compose("config", overrides=["experiment=tiny_cpu"])
        real = compose("config", overrides=["experiment=phi2_clip336"])
    assert tiny.backbones.vision.epochs >= 1 and tiny.model.pretrained
    assert real.backbones is None  # present, so DVC finds the parameter for every recipe
    assert (
        OmegaConf.to_container(real.model, resolve=True)["vision_tower"]["name_or_path"]
        == "openai/clip-vit-large-patch14-336"
    )
