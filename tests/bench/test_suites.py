"""The model-level suites' --quick runs (at tiny widths) write valid JSON with their keys, and their
correctness checks pass. Never a timing assertion: verdicts only have to be well-formed."""

from __future__ import annotations

import json

import pytest

from bench import cli, e2e, registry

FAST = {"repeats": 1, "warmup": 0, "max_waiting_cores": cli.DISABLED}  # shared CI machines: never wait
TINY_MODEL = {"d_model": 64, "ffn": 128, "heads": 4}
# The tiny_cpu preset with a smaller model and batches (the data and e2e suites compose the real config).
TINY_PRESET = (
    "model.vision_tower.config.hidden_size=32",
    "model.vision_tower.config.intermediate_size=64",
    "model.vision_tower.config.num_hidden_layers=2",
    "model.language_model.config.hidden_size=32",
    "model.language_model.config.intermediate_size=64",
    *(
        f"++stage_overrides.{stage}.{key}=4"
        for stage in ("stage1", "stage2", "stage3")
        for key in ("micro_batch_size", "global_batch_size")
    ),
)
STATS = {"median", "min", "max", "n"}


def _run(name, tmp_path_factory, **overrides) -> dict:
    out = tmp_path_factory.mktemp(name) / f"{name}.json"
    result = cli.run_suite(name, quick=True, out=out, log=lambda _line: None, **overrides)
    written = json.loads(out.read_text())
    assert written["suite"] == name and written["quick"] is True and written["schema_version"] == 1
    assert written["all_checks_passed"] is True, [c for c in written["checks"] if not c["passed"]]
    assert result["json_path"] == str(out) and written["environment"]["torch"]
    for c in written["checks"]:
        assert c["compared"] and c["passed"] is True
    for v in written["targets"]:
        assert {"target", "case", "text", "met"} <= set(v)
        if v["met"] is not None:
            assert isinstance(v["met"], bool) and {"value", "threshold", "margin", "op"} <= set(v)
    return written


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    return _run("training", tmp_path_factory, **FAST, **TINY_MODEL, batch_size=2, seq_len=72)


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    return _run(
        "generation", tmp_path_factory, **FAST, **TINY_MODEL, batch_sizes=[1, 2], prompt_len=4, new_tokens=3
    )


def test_training_quick(training):
    (row,) = training["results"]
    assert row["case"] == "float32/2x72" and row["tokens_per_step"] == 144
    assert set(row["times_ms"]) == {"dense", "moe", "gemm_ceiling"}
    for stats in (*row["times_ms"].values(), *row["tokens_per_s"].values(), *row["mfu"].values()):
        assert set(stats) == STATS and stats["n"] == 1
    assert row["expert_path"] == ["loop"] and training["environment"]["moe_expert_path"] == ["loop"]
    assert row["moe_layers"] == [0, 2]
    dense, moe = row["flops_per_step"]["dense"], row["flops_per_step"]["moe"]
    assert row["flop_ratio_moe_vs_dense"] == pytest.approx(moe["total"] / dense["total"])
    assert "experts" in moe["by_term"] and "router" in moe["by_term"] and "experts" not in dense["by_term"]
    assert 0.0 <= row["moe_drop_fraction"] <= 1.0
    assert {c["name"] for c in training["checks"]} == {
        "upcycling_identity",
        "moe_layer_placement",
        "trainable_set_dense",
        "trainable_set_moe",
    }
    assert {v["target"] for v in training["targets"]} == {"moe_time_vs_flops", "mfu_dense", "mfu_moe"}


def test_generation_quick(generation):
    assert [row["case"] for row in generation["results"]] == ["batch 1", "batch 2"]
    for row in generation["results"]:
        assert set(row["times_ms"]) == {"dense", "moe"} and row["new_tokens"] == 3
        assert row["expert_path"] == ["loop"]
        assert row["prompt_tokens"] == 1 + 64 + 4  # leading token, the image's tokens, the text
        assert set(row["tokens_per_s_ratio_moe_vs_dense"]) == STATS
        assert 0 < row["flop_ratio_dense_vs_moe"] < 1
        step = row["decode_ffn_step"]  # one decode step's FFN at the first MoE layer
        assert step["layer"].endswith("layers.0.mlp") and step["rows"] == row["batch_size"]
        assert step["decode_steps"] == 2 and step["moe_layers"] == 2 and step["top_k"] == 2
        assert set(step["times_ms"]) == {"dense_ffn", "moe_block", "experts_alone"}
        for key in ("experts_alone_vs_dense_ffn", "moe_block_vs_dense_ffn", "moe_block_vs_experts_alone"):
            assert set(step[key]) == STATS and step[key]["median"] > 0
        dense_s = row["times_ms"]["dense"]["median"] / 1e3
        expected = dense_s / (dense_s + max(step["min_extra_s_per_call"], 0.0))
        assert row["bound_tokens_per_s_ratio"] == pytest.approx(expected) and 0 < expected <= 1
    names = [c["name"] for c in generation["checks"]]
    assert names.count("upcycling_identity") == 2 and names.count("fixed_new_tokens") == 2
    assert [v["target"] for v in generation["targets"]] == ["moe_tokens_per_s_vs_flops"] * 2
    for v, row in zip(generation["targets"], generation["results"]):
        assert (
            v["bound_tokens_per_s_ratio"] == row["bound_tokens_per_s_ratio"] and "free routing" in v["note"]
        )


def test_data_quick(tmp_path_factory):
    result = _run(
        "data", tmp_path_factory, **FAST, batch_size=8, step_batches=1, hydra_overrides=list(TINY_PRESET)
    )
    (row,) = result["results"]
    assert row["batch_size"] == 8 and row["num_workers"] == 0  # the CPU trainer config's default
    assert set(row["samples_per_s"]) == {"loader", "train_step"} and set(row["headroom"]) == STATS
    assert result["data"]["source"].startswith("generated") and result["data"]["records"] >= 8
    assert result["data"]["trainable"] == ["projector", "language_model"]  # the paper's stage 2
    assert {c["name"] for c in result["checks"]} == {"batch_contract", "train_step_loss_finite"}
    assert [v["target"] for v in result["targets"]] == ["loader_headroom"]


def test_e2e_quick(tmp_path_factory):
    result = _run("e2e", tmp_path_factory, max_steps=1, evaluate=False, hydra_overrides=list(TINY_PRESET))
    (pipeline,) = result["runs"]
    assert list(pipeline["stages"]) == ["backbones", "stage1", "stage2", "stage3"]
    assert pipeline["stages"]["backbones"]["seconds"] > 0
    for name, stage in pipeline["stages"].items():
        if name != "backbones":
            assert stage["seconds"] > 0 and stage["global_step"] == 1 and stage["train_batches"] == 1
    assert set(result["stage_seconds"]) == {"backbones", "stage1", "stage2", "stage3"}
    assert result["total_seconds"]["median"] == pytest.approx(
        sum(s["seconds"] for s in pipeline["stages"].values())
    )
    assert result["evaluation"]["status"] == "skipped" and result["targets"] == []
    assert [c["name"] for c in result["checks"]] == ["stage_completed"] * 3


def test_evaluation_hook_reports_a_missing_entry_point(monkeypatch):
    monkeypatch.setattr(e2e, "EVAL_MODULE", "moe_llava.no_such_evaluate")
    assert e2e.evaluation_available()[0] is False
    outcome = e2e.run_evaluation(["experiment=tiny_cpu"], timeout_s=5)
    assert outcome["status"] == "unavailable" and "hook" in outcome["reason"] and outcome["seconds"] is None


def test_suite_selection_and_option_routing(capsys):
    assert list(registry.SUITES) == ["moe_layer", "training", "generation", "data", "e2e"]
    per_suite = cli.split_overrides(["training", "generation"], {"d_model": 64, "new_tokens": 2}, quick=True)
    assert per_suite == {"training": {"d_model": 64}, "generation": {"d_model": 64, "new_tokens": 2}}
    assert cli.main(["training", "generation", "--tokens", "64", "--quick"]) == 2
    assert "--tokens does not apply to the selected suite(s) training, generation" in capsys.readouterr().err
    assert cli.main(["nope"]) == 2
    assert "unknown benchmark suite 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no option"):
        cli.build_config("e2e", quick=True, d_model=64)


def test_moe_llava_cli_has_the_bench_command(capsys):
    from moe_llava.cli import build_parser

    args = build_parser().parse_args(["bench", "training", "--quick", "--d-model", "64"])
    assert args.suites == ["training"] and args.quick and args.d_model == 64 and args.func is not None
