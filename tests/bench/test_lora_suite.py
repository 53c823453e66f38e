"""bench.lora's meta-device part: stage 3's trainable set and AdamW bytes, full against LoRA."""

from __future__ import annotations

from bench import lora


def test_meta_footprint_counts_full_and_lora_stage3_of_a_recipe():
    out = lora.meta_footprint("tiny", gpus=2)
    full, adapted = out["full"], out["lora"]
    assert set(full["parts"]) == {"experts.full", "ffn.full", "projector.full", "routers.full"}
    assert set(adapted["parts"]) == {"experts.lora", "ffn.lora", "projector.full", "routers.full"}
    assert adapted["parts"]["projector.full"] == full["parts"]["projector.full"]
    assert adapted["trainable"] < full["trainable"] / 4
    for row in (full, adapted):
        assert row["adam_state_bytes_per_gpu_ddp"] == 8 * row["trainable"]
        assert row["adam_state_bytes_per_gpu_zero2"] == 4 * row["trainable"]
