"""Parameter counts, including the paper's Phi-2 x4 top-2 numbers built on the meta device."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe_llava.model import count_parameters, upcycle_to_moe
from moe_llava.model.builder import build_language_model
from tests.conftest import tiny_llama_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_phi2_recipe_matches_paper_counts_on_meta():
    recipe = OmegaConf.load(REPO / "conf/model/phi2_clip336.yaml")
    model = instantiate(recipe, pretrained=False, device="meta")
    assert next(model.parameters()).device.type == "meta"
    dense = count_parameters(model.language_model)
    assert dense.total == pytest.approx(2.78e9, rel=0.02)
    assert model.upcycle(num_experts=4, top_k=2, layers="sparse") == list(range(0, 32, 2))
    counts = count_parameters(model)
    lm = counts.parts["language_model"]
    assert lm.total == pytest.approx(5.3e9, rel=0.02)
    assert lm.activated == pytest.approx(3.6e9, rel=0.02)
    assert counts.parts["vision_tower"].total == pytest.approx(303.5e6, rel=0.01)  # CLIP ViT-L/14 vision half
    assert counts.total == sum(p.total for p in counts.parts.values())


@pytest.mark.parametrize(
    ("recipe", "total", "activated"), [("qwen_clip336", 3.1e9, 2.2e9), ("stablelm_clip336", 2.9e9, 2.0e9)]
)
def test_other_recipes_close_to_paper(recipe, total, activated):
    model = instantiate(OmegaConf.load(REPO / f"conf/model/{recipe}.yaml"), pretrained=False, device="meta")
    model.upcycle(num_experts=4, top_k=2, layers="sparse")
    lm = count_parameters(model).parts["language_model"]
    assert lm.total == pytest.approx(total, rel=0.05)
    assert lm.activated == pytest.approx(activated, rel=0.05)


def test_bare_language_model_counts_exactly():
    lm = build_language_model(
        {"config": {"model_type": "llama", **tiny_llama_config().to_diff_dict()}}, False
    )
    dense = count_parameters(lm)
    assert dense.total == dense.activated == sum(p.numel() for p in lm.parameters())
    expert = sum(p.numel() for p in lm.model.layers[0].mlp.parameters())
    upcycle_to_moe(lm, num_experts=4, top_k=2, layers=[0, 1])
    counts = count_parameters(lm)
    router = 4 * lm.config.hidden_size
    assert counts.total == dense.total + 2 * (3 * expert + router)
    assert counts.activated == dense.total + 2 * (expert + router)
    assert counts.as_dict() == {"total": counts.total, "activated": counts.activated}


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        lm = build_language_model(
            {"config": {"model_type": "llama", **tiny_llama_config().to_diff_dict()}}, False
        )
    assert all(p.device.type == "meta" for p in lm.parameters())


def test_bytes_written_per_stage_for_phi2_x4_are_the_ones_docs_state():
    """docs/training.md's storage table, computed from the recipe's shapes on the meta device."""
    from moe_llava.model.params import storage_bytes
    from moe_llava.training.stages import configure_trainable

    model = instantiate(
        OmegaConf.load(REPO / "conf/model/phi2_clip336.yaml"), pretrained=False, device="meta"
    )
    rows = []
    for stage, groups in (
        ("stage1", ["projector"]),
        ("stage2", ["projector", "language_model"]),
        ("stage3", None),
    ):
        if groups is None:
            model.upcycle(num_experts=4, top_k=2, layers="sparse")
            groups = ["projector", "ffn"]
        trainable = set(configure_trainable(model, groups))
        bf16 = storage_bytes(model, trainable, torch.bfloat16)
        fp32 = storage_bytes(model, trainable, torch.float32)
        gb = [
            round(x / 1e9, 1)
            for x in (bf16["export"], fp32["export"], bf16["checkpoint"], bf16["checkpoint_zero2_total"])
        ]
        rows.append(f"| {stage} | {gb[0]} GB | {gb[1]} GB | {gb[2]} GB | {gb[3]} GB |")
    doc = (REPO / "docs" / "training.md").read_text()
    for row in rows:
        assert row in doc, f"docs/training.md should have the row\n{row}"
    assert rows[2].startswith("| stage3 | 11.2 GB | 22.4 GB |")  # the MoE export halves in bf16
