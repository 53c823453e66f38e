"""Every benchmark suite runs at tiny sizes and reports what its README says; never a timing assertion.

The training step is checked to be the real one: the stage's trainable set moves, the rest does
not, and the learning-rate schedule steps.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import common, e2e, generation, moe_layer, training
from moe_llava.model.moe import moe_blocks
from moe_llava.training.stages import configure_trainable

TINY = {"d_model": 64, "ffn": 128}
# The tiny_cpu preset with a smaller model and batches (the e2e suite composes the real config).
TINY_PRESET = (
    "model.vision_tower.config.hidden_size=32",
    "model.vision_tower.config.intermediate_size=64",
    "model.vision_tower.config.num_hidden_layers=2",
    "model.language_model.config.hidden_size=32",
    "model.language_model.config.intermediate_size=64",
    "stage.micro_batch_size=4",
    "stage.global_batch_size=4",
)


def test_interleaved_rotates_the_order_and_pairs_rounds():
    calls = []
    times = common.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=2,
        label="l",
        sub_label="s",
        warmup=0,
    )
    assert calls == ["a", "b", "b", "a"] and [len(ms) for ms in times.values()] == [2, 2]
    assert times["a"][0].task_spec.description == "a" and times["a"][0].task_spec.label == "l"
    assert common.paired_ratio([2.0, 6.0, 9.0], [1.0, 2.0, 3.0]) == 3.0


def test_moe_layer_compares_every_variant(tmp_path):
    result = moe_layer.run(**TINY, tokens=(16,), rounds=1, min_run_time=None)
    assert {(r["dtype"], r["mode"]) for r in result["rows"]} == {
        (dtype, mode) for dtype in ("float32", "bfloat16") for mode in ("fwd", "fwd_bwd")
    }
    for row in result["rows"]:
        assert row["tokens"] == 16 and row["expert_path"] == "loop"  # the automatic path on CPU
        assert {"dense", "moe", "mixtral[eager]", "mixtral[grouped_mm]"} <= set(row["median_ms"])
        assert "moe[loop]" not in row["median_ms"]  # the automatic path is not timed twice
        assert row["moe_vs_k_dense"] > 0 and row["mixtral_vs_moe"] > 0
        assert row["fastest_mixtral"].startswith("mixtral[")
    out = tmp_path / "layer.json"
    args = [
        "--d-model",
        "64",
        "--ffn",
        "128",
        "--tokens",
        "8",
        "--dtypes",
        "float32",
        "--modes",
        "fwd",
        "--rounds",
        "1",
        "--out",
    ]
    moe_layer.main([*args, str(out)])
    written = json.loads(out.read_text())
    assert written["suite"] == "moe_layer" and written["environment"]["torch"] == torch.__version__
    assert [(r["tokens"], r["mode"]) for r in written["rows"]] == [(8, "fwd")]


def test_mixtral_copy_computes_what_the_block_computes():
    blocks = moe_layer.build_blocks(64, 128, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            moe_layer.output(blocks["mixtral[grouped_mm]"], x), blocks["moe"](x), atol=1e-5, rtol=1e-5
        )


def test_training_suite_runs_the_stage_steps():
    result = training.run(**TINY, layers=4, heads=4, batch_size=2, seq_len=72, rounds=1, steps=1)
    assert set(result["step_ms"]) == set(result["tokens_per_s"]) == {"dense", "moe"}
    assert result["moe_layers"] == [0, 2] and result["moe_vs_dense_time"] > 0
    assert result["moe_vs_dense_parameters_per_token"] > 1  # top-2 experts run per token
    assert {m.task_spec.sub_label for m in result["measurements"]} == {"dense", "moe"}


def test_training_step_is_the_lightning_modules():
    moe = common.upcycled_copy(common.build_dense(**TINY, layers=2, heads=4))
    stage = common.load_conf("stage", "stage=stage3")
    configure_trainable(moe, stage["trainable"])
    before = {name: p.detach().clone() for name, p in moe.named_parameters()}
    batch = common.synthetic_batch(moe, 2, 72)
    seconds = training.fit_batches(moe, stage, batch, steps=2, precision="32-true", accelerator="cpu")
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    moved = {name for name, p in moe.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in moe.named_parameters() if p.requires_grad}
    assert moved <= trainable  # frozen parts (attention, embeddings, vision tower) did not move
    # Stage 3's set did (an expert that got no token has a zero gradient, so Adam leaves it).
    assert any(".experts." in n for n in moved) and any(".router." in n for n in moved)
    assert any(n.startswith("projector.") for n in moved)
    assert all(block.last_stats is not None for _, block in moe_blocks(moe))


def test_generation_suite_reports_tokens_per_second():
    result = generation.run(**TINY, heads=4, batch_sizes=(1, 2), prompt_len=4, new_tokens=3, rounds=1)
    assert [row["batch_size"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert set(row["tokens_per_s"]) == {"dense", "moe"} and row["moe_vs_dense_tokens_per_s"] > 0


def test_e2e_times_every_pipeline_step():
    result = e2e.run(quick=True, max_steps=1, evaluate=False, overrides=TINY_PRESET)
    stages = result["stages"]
    assert list(stages) == ["backbones", "stage1", "stage2", "stage3"]
    assert stages["backbones"]["seconds"] > 0
    for name, stage in stages.items():
        assert stage["completed"]
        if name != "backbones":
            assert stage["global_step"] == 1 and stage["train_batches"] == 1 and stage["fit_s"] >= 0
            assert stage["export_is_moe"] == (name == "stage3")
    assert result["total_seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert result["evaluation"] == {"status": "skipped", "seconds": None}
