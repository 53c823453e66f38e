"""The vision probe: the tower + object head learn the training objects; POPE-style F1 per split."""

from __future__ import annotations

import json

import pytest
import torch

from moe_llava.cli import main
from moe_llava.evaluation.pope import POPE_SPLITS
from moe_llava.evaluation.vision_probe import ProbeConfig, _best_threshold, _f1, run_probe

TOWER = {
    "name_or_path": None,
    "config": {
        "model_type": "clip_vision_model",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
}


def test_f1_and_best_threshold_on_known_scores():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.7])
    labels = torch.tensor([True, True, False, False, False])
    assert _f1(scores, labels, 0.5) == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # tp 2, fp 1 (0.7)
    threshold, best = _best_threshold(scores, labels)
    assert best == 1.0 and threshold == pytest.approx(0.8)


def test_probe_fits_the_training_objects_and_scores_every_pope_split(shapesworld):
    logs = []
    result = run_probe(shapesworld, TOWER, ProbeConfig(epochs=4, batch_size=8, lr=3e-3), log=logs.append)
    assert len(result.epochs) == 4 and len(logs) == 4
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    assert len(result.objects) == len(set(result.objects)) >= 5
    for row in result.epochs:
        for split in POPE_SPLITS:
            assert 0.0 <= row[f"{split}/f1"] <= row[f"{split}/f1_oracle"] <= 1.0
        assert row["mean_f1"] == pytest.approx(sum(row[f"{s}/f1"] for s in POPE_SPLITS) / 3)


def test_probe_stops_at_the_time_budget(shapesworld):
    result = run_probe(
        shapesworld, TOWER, ProbeConfig(epochs=50, batch_size=16, time_budget_s=0.0), log=lambda _: None
    )
    assert len(result.epochs) == 1


def test_probe_cli_writes_json(shapesworld, tmp_path, capsys):
    model = tmp_path / "model.yaml"
    model.write_text(json.dumps({"vision_tower": TOWER}))  # JSON is YAML
    out = tmp_path / "probe.json"
    argv = ["eval", "vision-probe", "--data-root", str(shapesworld), "--model", str(model)]
    assert main([*argv, "--set", "hidden_size=16", "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epoch"] == 1 and 0.0 <= summary["mean_f1"] <= 1.0
    saved = json.loads(out.read_text())
    assert saved["vision_tower"]["hidden_size"] == 16 and len(saved["epochs"]) == 1
    with pytest.raises(SystemExit, match="patch"):
        main([*argv, "--set", "no_such_key=1"])


def test_probe_names_file_and_line_of_a_bad_record(shapesworld, tmp_path):
    import shutil

    broken = tmp_path / "world"
    shutil.copytree(shapesworld, broken)
    lines = (broken / "pope_popular.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    del record["object"]
    lines[2] = json.dumps(record)
    (broken / "pope_popular.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pope_popular.jsonl:3: record lacks field\(s\) \['object'\]"):
        run_probe(broken, TOWER, ProbeConfig(epochs=1), log=lambda _: None)


def test_probe_of_a_pretrained_tower_keeps_it_frozen(shapesworld, tmp_path, capsys):
    from safetensors.torch import load_file

    from moe_llava.model.builder import build_image_processor, build_vision_tower

    tower_dir = tmp_path / "tower"
    build_vision_tower(TOWER, pretrained=False).save_pretrained(tower_dir)
    build_image_processor(TOWER, pretrained=False).save_pretrained(tower_dir)
    before = load_file(tower_dir / "model.safetensors")
    result = run_probe(
        shapesworld,
        {},
        ProbeConfig(epochs=2, batch_size=8, lr=3e-3, pretrained_tower=str(tower_dir)),
        log=lambda _: None,
    )
    assert result.vision_tower["hidden_size"] == 32 and len(result.epochs) == 2
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]  # the head learns
    tower_size = sum(v.numel() for v in before.values())
    trainable = run_probe(shapesworld, TOWER, ProbeConfig(epochs=1, batch_size=8), log=lambda _: None)
    assert trainable.trainable_parameters - result.trainable_parameters == tower_size  # frozen tower
    argv = [
        "eval",
        "vision-probe",
        "--data-root",
        str(shapesworld),
        "--tower",
        str(tower_dir),
        "--epochs",
        "1",
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 1
