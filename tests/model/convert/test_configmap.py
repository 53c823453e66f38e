"""config.json of the released checkpoints: every field mapped, or refused naming it."""

from __future__ import annotations

import json

import pytest
import torch

from moe_llava.cli import main
from moe_llava.model.checkpoint import load_export_model
from moe_llava.model.convert import convert_released
from moe_llava.model.convert.configmap import ConfigRefused, released_to_ours
from tests.model.convert.released_layout import released_config, vision_config, write_released


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"model_type": "llava_llama"}, "model_type", "is not a released MoE-LLaVA model"),
        ({"moe": {"ep_size": 2}}, "moe.ep_size", "expert parallelism is not supported"),
        ({"moe": {"use_residual": True}}, "moe.use_residual", "residual MoE"),
        ({"moe": {"num_experts": [4, 8]}}, "moe.num_experts", "one expert count"),
        ({"moe": {"moe_layers_idx": [0, 9]}}, "moe.moe_layers_idx", "out of range"),
        ({"moe": {"gate_noise": 1}}, "moe.gate_noise", "unknown field"),
        ({"moe": {"top_k_experts": 1}}, "moe.top_k_experts", "only top-2"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end", "not supported"),
        (
            {"mm_video_tower": "LanguageBind/Video", "video_projector_type": "linear"},
            "mm_video_tower",
            "video",
        ),
        ({"image_projector_type": "qformer"}, "image_projector_type", "not supported"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size", "vision tower's hidden_size"),
        ({"mm_image_tower": "openai/clip-vit-base-patch16"}, "mm_image_tower", "--vision-tower"),
        ({"some_new_switch": 1}, "some_new_switch", "unknown field"),
        ({"rotary_pct": 0.5}, "rotary_pct", "only 1.0"),
    ],
)
def test_unsupported_fields_are_refused_by_name(tmp_path, change, field, words):
    backbone = "qwen" if field == "rotary_pct" else "phi"
    config = released_config(backbone)
    for key, value in change.items():
        if key == "moe":
            config["moe"].update(value)
        else:
            config[key] = value
    file = tmp_path / "config.json"
    override = None if field == "mm_image_tower" else vision_config("clip")
    with pytest.raises(ConfigRefused, match=words) as info:
        released_to_ours(config, file, vision_config=override)
    assert info.value.field == field
    assert str(info.value).startswith(f"{file}: field {field!r}: ") and "\n" not in str(info.value)


def test_the_cli_refuses_ep_size_2_in_one_line(tmp_path, capsys):
    config = released_config("phi", moe={"ep_size": 2})
    src, _ = write_released(tmp_path / "r", "phi", config=config)
    (tmp_path / "v.json").write_text(json.dumps(vision_config("clip")))
    assert (
        main(["model", "convert", str(src), str(tmp_path / "o"), "--vision-config", str(tmp_path / "v.json")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"moe-llava: error: {src / 'config.json'}: field 'moe.ep_size': 2: expert parallelism is not supported (only 1)"
    )


@pytest.mark.parametrize("backbone", ["phi", "stablelm", "qwen"])
def test_moe_and_multimodal_fields_are_mapped(tmp_path, backbone):
    vision = "siglip" if backbone == "phi" else "clip"
    src, _ = write_released(tmp_path / "r", backbone, vision=vision, config=released_config(backbone, vision))
    convert_released(src, tmp_path / "o", vision_config=vision_config(vision))
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["model_type"] == "moe_llava" and config["architectures"] == ["MoELlavaForCausalLM"]
    assert config["moe"] == {
        "num_experts": 4, "top_k": 2, "layers": [0, 2], "capacity_factor": 1.5, "eval_capacity_factor": 2.0,
        "min_capacity": 0, "second_expert_noise": False, "count_padding": True, "expert_path": "auto",
    }  # fmt: skip
    assert config["router_aux_loss_coef"] == 0.01 and config["vision_feature_layer"] == -2
    assert config["projector_type"] == "mlp2x_gelu" and config["image_aspect"] == "pad"
    assert config["conversation_template"] == ("stablelm" if backbone == "stablelm" else "phi")
    # the reference's pad colour truncates image_mean * 255: CLIP (122, 116, 104), SigLIP 127
    assert config["pad_color"] == ([127, 127, 127] if vision == "siglip" else [122, 116, 104])
    assert config["drop_first_patch"] is (vision == "siglip")
    text = config["text_config"]
    assert text["model_type"] == {"phi": "phi", "stablelm": "stablelm", "qwen": "qwen2"}[backbone]
    if backbone == "qwen":  # Qwen-1's rope and norm settings, its MLP width halved
        assert text["intermediate_size"] == 64 and text["rms_norm_eps"] == 1e-6
        assert text["rope_parameters"]["rope_theta"] == 10000.0 and text["max_position_embeddings"] == 256
    if backbone == "stablelm":
        assert text["rope_parameters"]["partial_rotary_factor"] == 0.25 and text["use_qkv_bias"] is True
        assert text["use_parallel_residual"] is False
    model = load_export_model(tmp_path / "o")
    routers = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert routers and all(p.dtype == torch.float32 for p in routers)
