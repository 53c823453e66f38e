"""Converted checkpoints compute what the released ones do: fp32 logits against the independent
oracle (oracle.py) for every backbone, text only and with an image, batch 1 and 2, CLIP and SigLIP,
and with an eval capacity small enough to drop tokens."""

from __future__ import annotations

import pytest
import torch

from moe_llava.model.checkpoint import load_export_model
from moe_llava.model.convert import convert_released
from tests.model.convert.oracle import IMAGE_PLACEHOLDER, Oracle, oracle_logits
from tests.model.convert.released_layout import VISION, released_config, vision_config, write_released

ATOL = 1e-5
PAD = 0


def _expand(ids: list[int], image_id: int, n: int) -> list[int]:
    out = []
    for token in ids:
        out.extend([image_id] * n if token == IMAGE_PLACEHOLDER else [token])
    return out


def ours_logits(model, prompts: list[list[int]], pixel_values):
    n, image_id = model.num_image_tokens, model.config.image_token_id
    rows = [_expand(p, image_id, n) for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask)
    return out.logits, mask


def _prompts(batch: int, image: bool, avoid: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(batch):
        text = torch.randint(1, 90, (9 - 3 * i,), generator=g)  # different lengths: right padding
        text = text.masked_fill(text == avoid, avoid + 1).tolist()  # the image token's id is not text
        prompts.append([*text[:3], IMAGE_PLACEHOLDER, *text[3:]] if image else text)
    return prompts


def _compare(tmp_path, backbone, vision="clip", ecf=2.0, **write_kwargs):
    config = released_config(backbone, vision, moe={"eval_capacity_factor": ecf})
    src, state = write_released(tmp_path / "released", backbone, vision=vision, config=config, **write_kwargs)
    dst = tmp_path / "ours"
    convert_released(src, dst, vision_config=vision_config(vision))
    model = load_export_model(dst, dtype=torch.float32).eval()
    oracle = Oracle(state, config, vision_config(vision))
    results = {}
    for batch in (1, 2):
        for image in (False, True):
            prompts = _prompts(batch, image, model.config.image_token_id)
            g = torch.Generator().manual_seed(batch)
            pixels = (
                torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
                if image
                else None
            )
            expected, mask, dropped = oracle(prompts, pixels, PAD)
            got, our_mask = ours_logits(model, prompts, pixels)
            assert torch.equal(mask, our_mask)
            valid = mask.bool()
            diff = (got[valid] - expected[valid]).abs().max().item()
            assert diff < ATOL, (backbone, vision, batch, image, diff)
            results[(batch, image)] = (diff, dropped)
    return model, results


@pytest.mark.parametrize(
    ("backbone", "vision", "write_kwargs"),
    [
        ("phi", "clip", {}),
        ("phi", "siglip", {"router_dtype": torch.bfloat16}),
        ("stablelm", "clip", {}),
        ("qwen", "clip", {}),
        ("qwen", "siglip", {}),
    ],
)
def test_logits_equal_the_reference_semantics(tmp_path, backbone, vision, write_kwargs):
    model, _results = _compare(tmp_path, backbone, vision, **write_kwargs)
    assert model.config.drop_first_patch == (vision == "siglip")
    assert model.num_image_tokens == (3 if vision == "siglip" else 4)  # 2x2 patches, reference: 728 of 729


@pytest.mark.parametrize("backbone", ["phi", "qwen"])
def test_a_small_eval_capacity_drops_the_same_tokens(tmp_path, backbone):
    _, results = _compare(tmp_path, backbone, ecf=0.5)
    assert all(dropped > 0 for _, dropped in results.values())  # the comparison did exercise drops


def test_a_permuted_expert_or_swapped_gate_up_shows(tmp_path):
    config = released_config("qwen")
    src, state = write_released(tmp_path / "released", "qwen", config=config)
    convert_released(src, tmp_path / "ours", vision_config=vision_config("clip"))
    model = load_export_model(tmp_path / "ours", dtype=torch.float32).eval()
    prompts = _prompts(1, False, model.config.image_token_id)
    expected, _mask, _ = oracle_logits(state, config, vision_config("clip"), prompts, None, PAD)
    layers = model.language_model.model.layers
    block = layers[0].mlp
    with torch.no_grad():
        a, b = block.experts[0].up_proj.weight, block.experts[1].up_proj.weight
        saved = a.clone()
        a.copy_(b)
        b.copy_(saved)
    got, _ = ours_logits(model, prompts, None)
    assert (got - expected).abs().max() > 1e-3
    with torch.no_grad():  # back, then swap a dense layer's gate and up
        b.copy_(a)
        a.copy_(saved)
        mlp = layers[1].mlp
        saved = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(saved)
    got, _ = ours_logits(model, prompts, None)
    assert (got - expected).abs().max() > 1e-3
