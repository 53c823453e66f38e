"""Continue MoE-tuning a released model, end to end on a stand-in: a released-layout Phi checkpoint
(with ShapesWorld's tokenizer and image size) is converted, loads through the Auto classes, chats,
trains two stage-3 steps on LLaVA-format data (no second upcycling), is evaluated and registered.
Pointing ``init_from`` at the unconverted folder is a one-line error naming the converter."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import moe_llava  # noqa: F401  (registers the model with the Auto classes)
from moe_llava.cli import main
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.errors import ConfigError
from moe_llava.training import run_stage
from tests.conftest import tiny_vision_values
from tests.model.convert.released_layout import released_config, released_state, vision_config, write_released
from tests.training.conftest import shrunk_overrides

# ShapesWorld's images (32 px) through a tower of the shrunk tiny_cpu recipe's size
TOWER = tiny_vision_values(image_size=32, patch_size=8)


@pytest.fixture
def clean_hydra():
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def released(shapesworld, tmp_path):
    tokenizer = load_tokenizer(shapesworld / "tokenizer")
    vocab = len(tokenizer)
    config = released_config("phi", vision_values=TOWER, vocab_size=vocab, max_position_embeddings=2048)
    state = released_state("phi", vocab=vocab, vision_values=TOWER)
    folder, _ = write_released(tmp_path / "MoE-LLaVA-Phi2-2.7B-4e", "phi", state=state, config=config)
    for file in folder.glob("*.json"):
        if file.name not in ("config.json", "model.safetensors.index.json"):
            file.unlink()
    tokenizer.save_pretrained(str(folder))  # Phi's tokenizer files are native: taken as they are
    return folder


@pytest.mark.slow
def test_convert_then_continue_moe_tuning_evaluate_and_register(
    released,
    shapesworld,
    compose_stage,
    tmp_path,
    capsys,
    monkeypatch,
    clean_hydra,
):
    # a hub id (nothing is downloaded here) and the unconverted folder: refused before any model
    # loads, in one line naming the command
    with pytest.raises(ConfigError, match=r"hub id .* `moe-llava model convert DIR DST`"):
        run_stage(compose_stage("stage3", "init_from=LanguageBind/MoE-LLaVA-Phi2-2.7B-4e"))
    with pytest.raises(ConfigError, match=r"moe-llava model convert .*MoE-LLaVA-Phi2-2.7B-4e DST") as info:
        run_stage(compose_stage("stage3", f"init_from={released}"))
    assert str(info.value).startswith("init_from: ") and "\n" not in str(info.value)

    converted = tmp_path / "converted"
    (tmp_path / "tower.json").write_text(json.dumps(vision_config("clip", TOWER)))
    args = [
        "model",
        "convert",
        str(released),
        str(converted),
        "--vision-config",
        str(tmp_path / "tower.json"),
    ]
    assert main(args) == 0
    capsys.readouterr()

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(converted)
    assert type(model).__name__ == "MoELlavaForCausalLM" and model.config.moe["layers"] == [0, 2]
    assert model.num_image_tokens == 16

    image = next((shapesworld / "images").rglob("*.png"))
    assert (
        main(
            ["chat", "--model", str(converted), "--image", str(image), "--max-new-tokens", "2", "What is it?"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""

    steps = ["stage.max_steps=2", "stage.global_batch_size=4", "logger.log_model_weights=false"]
    result = run_stage(compose_stage("stage3", f"init_from={converted}", *steps))
    assert result["global_step"] == 2
    export = tmp_path / "artifacts" / "stage3" / "export"
    trained = AutoModelForImageTextToText.from_pretrained(export)
    assert trained.config.moe == model.config.moe  # continued, not upcycled again
    before = model.language_model.model.layers[0].mlp.experts[0].fc1.weight
    assert not torch.equal(trained.language_model.model.layers[0].mlp.experts[0].fc1.weight, before)
    assert torch.equal(
        trained.language_model.model.embed_tokens.weight, model.language_model.model.embed_tokens.weight
    )

    monkeypatch.setattr(sys, "argv", ["moe-llava"])
    overrides = [
        *shrunk_overrides(shapesworld, tmp_path),
        "stage=stage3",
        "evaluation.limit=2",
        "evaluation.max_new_tokens=2",
        "evaluation.progress=false",
    ]
    assert main(["eval", "run", *overrides]) == 0
    metrics = export.parent / "eval" / "metrics.json"
    assert "pope/mean_f1" in json.loads(metrics.read_text())

    capsys.readouterr()
    register = ["registry", "register", "--model-dir", str(export), "--metrics", str(metrics)]
    register += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--model-name", "moe-llava-continued"]
    register += ["-o", f"logger.artifact_location={tmp_path}/mlartifacts"]
    assert main(register) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["version"] == "1" and registered["aliases"] == ["champion"]
