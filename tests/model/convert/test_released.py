"""``moe-llava model convert`` options: the vision tower from its own folder, a dtype for the weights."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from moe_llava.cli import main
from moe_llava.model.checkpoint import load_export_model
from moe_llava.model.convert import convert_released
from moe_llava.model.convert.layout import WeightFiles
from tests.model.convert.released_layout import VISION, vision_config, write_released


def test_the_vision_tower_from_its_own_folder(tmp_path):
    src, state = write_released(tmp_path / "released", "phi")
    tower_dir = tmp_path / "clip"
    torch.manual_seed(3)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    tower.save_pretrained(tower_dir)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_mean=[0.5, 0.4, 0.3])  # fmt: skip
    processor.save_pretrained(tower_dir)
    report = convert_released(src, tmp_path / "ours", vision_tower=tower_dir)
    assert any("vision tower from" in note for note in report.notes)
    model = load_export_model(tmp_path / "ours")
    for name, value in tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], value), name
    copy = state["model.image_tower.image_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert not torch.equal(model.vision_tower.encoder.layers[0].mlp.fc1.weight, copy)  # not the checkpoint's
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["pad_color"] == [127, 102, 76]  # from the tower's own processor, truncated


def test_dtype_casts_the_weights_but_not_the_routers(tmp_path, capsys):
    src, _ = write_released(tmp_path / "released", "stablelm")
    (tmp_path / "v.json").write_text(json.dumps(vision_config("clip")))
    args = [
        "model",
        "convert",
        str(src),
        str(tmp_path / "ours"),
        "--dtype",
        "bf16",
        "--max-shard-size",
        "50KB",
    ]
    assert main([*args, "--vision-config", str(tmp_path / "v.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtypes"]["float32"] == 2 and report["dtypes"]["bfloat16"] == report["tensors"] - 2
    files = WeightFiles(tmp_path / "ours")
    assert len(files.shards) > 1 and (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    for info in files.infos.values():
        assert info.dtype == (torch.float32 if info.name.endswith("router.weight") else torch.bfloat16), (
            info.name
        )
    with safe_open(str(files.shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    model = load_export_model(tmp_path / "ours", dtype=torch.bfloat16)
    assert model.language_model.model.layers[0].mlp.router.weight.dtype == torch.float32
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
