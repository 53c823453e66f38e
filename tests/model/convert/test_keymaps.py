"""Golden keys: at the released checkpoints' real sizes (on the meta device), our model's weights map
onto exactly the released key lists (shared/reference/moe-llava-checkpoints/released_keys.json), and
back, with nothing left over either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_llava.model.configuration import MoELlavaConfig
from moe_llava.model.convert import configmap, keymaps
from moe_llava.model.convert.released import expected_state
from tests.model.convert.released_layout import real_released_config

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "moe-llava-checkpoints"
KEYS_FILE = REFERENCE / "released_keys.json"
# the hub's index files (kB), reference doc 1.1
INDEX_KB = {"phi2_clip336": 110.3, "phi2_siglip384": 117.2, "qwen1_8b": 80.8, "stablelm1_6b": 92.1}
# the hub's file sizes (GB): Phi and StableLM 16-bit, Qwen fp32 (reference doc, appendix)
TOTAL_GB = {"phi2_clip336": 11.21, "phi2_siglip384": 11.46, "qwen1_8b": 13.46, "stablelm1_6b": 6.40}
SHARD_NAMES = {
    "phi2_clip336": "model-00001-of-00003.safetensors",
    "phi2_siglip384": "model-00001-of-00003.safetensors",
    "qwen1_8b": "pytorch_model-00001-of-00002.bin",
    "stablelm1_6b": "model-00001-of-00002.safetensors",
}


@pytest.fixture(scope="module")
def released_keys() -> dict[str, list[str]]:
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} is not here (shared/ reference data)")
    return json.loads(KEYS_FILE.read_text())


@pytest.mark.parametrize("name", list(INDEX_KB))
def test_released_keys_map_onto_every_weight_and_back(released_keys, name):
    config_dict = real_released_config(name)
    backbone, fields, _ = configmap.released_to_ours(config_dict, Path("config.json"))
    expected = expected_state(MoELlavaConfig(**fields, image_token_id=0))
    official = released_keys[name]

    ops, unmapped = keymaps.released_to_ours(backbone, official)
    assert unmapped == []
    targets = [op.target for op in ops]
    assert len(targets) == len(set(targets))
    extra = (
        {keymaps.PHI_LM_HEAD_BIAS} if backbone == "phi" else set()
    )  # the only weight we have beyond theirs
    assert set(targets) | extra == set(expected)

    back, unmapped = keymaps.ours_to_released(backbone, list(expected))
    assert unmapped == []
    assert sorted(op.target for op in back) == sorted(official)

    # shapes: the writer's index at real sizes is as long as the hub's
    total = 0
    for op in ops:
        shape = expected[op.target][0]
        if op.kind == "split":
            shape = (shape[0] * op.parts, *shape[1:])
        n = 1
        for s in shape:
            n *= s
        total += n * (2 if backbone != "qwen" else 4) / (op.parts if op.kind == "split" else 1)
    assert abs(total / 1e9 - TOTAL_GB[name]) < 0.015
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict.fromkeys(official, SHARD_NAMES[name])}
    assert abs(len(json.dumps(index, indent=2)) / 1000 - INDEX_KB[name]) < 0.2
