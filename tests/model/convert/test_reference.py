"""``--to reference``: our MoE export in the released layout; released -> ours -> released gives back
the same tensors (names, dtypes, values) and config values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_llava.cli import main
from moe_llava.errors import CheckpointError
from moe_llava.model.convert import convert_released, convert_to_reference
from moe_llava.model.convert.layout import WeightFiles
from tests.model.convert.released_layout import released_config, vision_config, write_released


def _state(folder) -> dict[str, torch.Tensor]:
    files = WeightFiles(folder)
    with files.reader() as reader:
        return {name: reader.get(name) for name in files.infos}


@pytest.mark.parametrize(
    ("backbone", "vision", "kwargs"),
    [("phi", "clip", {"router_dtype": torch.bfloat16}), ("stablelm", "siglip", {}), ("qwen", "clip", {})],
)
def test_released_to_ours_to_released_is_the_identity(tmp_path, backbone, vision, kwargs, capsys):
    config = released_config(backbone, vision)
    src, state = write_released(tmp_path / "released", backbone, vision=vision, config=config, **kwargs)
    ours, back = tmp_path / "ours", tmp_path / "back"
    (tmp_path / "v.json").write_text(json.dumps(vision_config(vision)))
    assert main(["model", "convert", str(src), str(ours), "--vision-config", str(tmp_path / "v.json")]) == 0
    assert main(["model", "convert", "--to", "reference", str(ours), str(back)]) == 0
    assert "converted" in capsys.readouterr().out
    round_trip = _state(back)
    assert round_trip.keys() == state.keys()
    for name, value in state.items():
        assert round_trip[name].dtype == value.dtype and torch.equal(round_trip[name], value), name
    assert json.loads((back / "config.json").read_text()) == config
    assert (back / "model.safetensors.index.json").is_file()  # the released layout is always indexed
    vocab = {"qwen": "qwen.tiktoken", "stablelm": "arcade100k.tiktoken"}.get(backbone)
    if vocab:  # the tiktoken vocabulary comes back rank for rank
        lines = set((src / vocab).read_text().splitlines())
        assert set((back / vocab).read_text().splitlines()) == lines


def test_a_model_trained_here_gets_the_released_layout(tmp_path):
    src, state = write_released(tmp_path / "released", "qwen")
    convert_released(src, tmp_path / "ours", vision_config=vision_config("clip"))
    (tmp_path / "ours" / "conversion.json").unlink()  # as if it had never been converted
    convert_to_reference(tmp_path / "ours", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "moe_llava_qwen" and config["architectures"] == ["MoELLaVAQWenForCausalLM"]
    assert config["moe"]["moe_layers_idx"] == [0, 2] and config["intermediate_size"] == 128
    assert config["mm_image_tower"] is None or isinstance(config["mm_image_tower"], str)
    back = _state(tmp_path / "back")
    assert back.keys() == state.keys()
    routers = [k for k in back if k.endswith("gate.wg.weight")]
    assert routers and all(back[k].dtype == torch.float32 for k in routers)
    assert (tmp_path / "back" / "qwen.tiktoken").is_file()


def test_a_trained_phi_lm_head_bias_is_refused(tmp_path):
    src, _ = write_released(tmp_path / "released", "phi")
    ours = tmp_path / "ours"
    convert_released(src, ours, vision_config=vision_config("clip"))
    shard = ours / "model.safetensors"
    weights = load_file(shard)
    weights["language_model.lm_head.bias"] = torch.full_like(weights["language_model.lm_head.bias"], 0.5)
    from safetensors.torch import save_file

    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head\.bias is not zero"):
        convert_to_reference(ours, tmp_path / "back")
