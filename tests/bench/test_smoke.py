"""`python -m bench moe_layer --quick` keeps working: structure of the JSON and the correctness checks, never timings."""

from __future__ import annotations

import json

import pytest

from bench import cli

# --quick at a small width so that the whole suite, every variant included, runs in seconds.
ARGS = [
    "moe_layer",
    "--quick",
    "--d-model",
    "64",
    "--ffn",
    "256",
    "--tokens",
    "64",
    "512",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--keep-loaded-rounds",  # CI machines are shared: never wait for them to go quiet
]
VARIANTS = {
    "dense",
    "moe",
    "experts_only",
    "expert_gemm_floor",
    "gemm_ceiling",
    "moe_cf1.5",
    "deepspeed_einsum",
}
MIXTRAL = {"mixtral_eager", "mixtral_grouped_mm", "mixtral_batched_mm"}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "moe_layer.json"
    assert cli.main([*ARGS, "--out", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_quick_run_writes_every_case_and_variant(quick_result):
    r = quick_result
    assert r["suite"] == "moe_layer" and r["quick"] is True and r["schema_version"] == 1
    assert r["config"]["activations"] == ["swiglu"] and r["config"]["dtypes"] == ["float32", "bfloat16"]
    cases = {(row["activation"], row["dtype"], row["tokens"], row["mode"]) for row in r["results"]}
    assert cases == {
        ("swiglu", dtype, tokens, mode)
        for dtype in ("float32", "bfloat16")
        for tokens in (64, 512)
        for mode in ("fwd", "fwd_bwd")
    }
    for row in r["results"]:
        assert set(row["times_ms"]) >= VARIANTS | MIXTRAL, row["skipped"]
        for stats in row["times_ms"].values():
            assert set(stats) == {"median", "min", "max", "n"} and stats["n"] == 1
        for key in ("ratio_moe_vs_k_dense", "speedup_vs_mixtral_fastest", "speedup_vs_deepspeed_einsum"):
            assert set(row[key]) == {"median", "min", "max", "n"}
        assert row["mixtral_fastest"] in MIXTRAL
        # the eager floor is a forward-only variant
        assert ("eager_moe_floor" in row["times_ms"]) == (row["mode"] == "fwd")
        assert ("eager_ceiling_speedup_vs_mixtral" in row) == (row["mode"] == "fwd")
        assert row["expert_path"] == r["environment"]["moe_expert_path"][0]
        assert set(row["gemm_fraction"]) >= {"dense", "moe"}
        assert set(row["peak_memory_bytes"]) >= {"dense", "moe", "deepspeed_einsum"}
        assert all(v > 0 for v in row["peak_memory_bytes"].values())
        assert row["memory_ratio_moe_vs_dense"] > 0


def test_quick_run_correctness_checks_all_passed(quick_result):
    checks = quick_result["checks"]
    names = {c["name"] for c in checks}
    assert {"upcycling_identity", "equal_to_deepspeed_einsum"} <= names
    assert {f"equal_to_{m}" for m in MIXTRAL} <= names
    failed = [c for c in checks if not c["passed"]]
    assert not failed and quick_result["all_checks_passed"] is True
    for c in checks:
        assert c["compared"] and c["max_rel_diff"] <= c["tolerance"]


def test_environment_drop_rates_and_target_verdicts(quick_result):
    env = quick_result["environment"]
    assert env["device"] in ("cpu", "cuda") and env["torch"] and env["moe_expert_path"]
    assert set(env["load"]) == {"cores", "own_cores_busy", "other_cores_busy", "waiting_cores"}
    for row in quick_result["results"]:
        rounds = row["rounds"]
        assert rounds["run"] >= 1 and 0 <= rounds["set_aside"] <= rounds["run"]
        assert len(rounds["kept_waiting_cores"]) == 1 and rounds["run"] == 1 and rounds["set_aside"] == 0
    drops = quick_result["drop_rates"]
    assert len(drops) == 4
    for d in drops:
        assert set(d["drop_rate"]) == {"1.0", "1.5", "2.0"}
        assert all(0.0 <= v <= 1.0 for v in d["drop_rate"].values())
        assert d["drop_rate"]["1.0"] >= d["drop_rate"]["1.5"] >= d["drop_rate"]["2.0"]
    verdicts = quick_result["targets"]
    # Mixtral applies from 512 tokens (both dtypes, both modes); the others need 2048 / 8192 tokens.
    mixtral = [v for v in verdicts if v["target"] == "speedup_vs_mixtral"]
    assert len(mixtral) == 4
    for v in mixtral:
        assert isinstance(v["met"], bool) and v["threshold"] == 1.10 and "margin" in v
        assert v["ceiling"] > 0 and isinstance(v["ceiling_met"], bool)
        if v["case"].endswith("/fwd"):
            assert v["eager_ceiling"] > 0 and isinstance(v["eager_ceiling_met"], bool)
        else:
            assert "eager_ceiling" not in v


def test_skipped_variants_are_left_out_and_the_rest_still_reported(tmp_path):
    out = tmp_path / "skip.json"
    args = [*ARGS, "--tokens", "64", "--dtypes", "float32", "--modes", "fwd"]
    skip = ["gemm_ceiling", "deepspeed_einsum", "mixtral_batched_mm"]
    assert cli.main([*args, "--skip", *skip, "--out", str(out), "--quiet"]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert not set(skip) & set(row["times_ms"]) and set(skip) <= set(row["skipped"])
    assert row["gemm_fraction"] == {}  # nothing to divide by without the GEMM ceiling
    assert row["speedup_vs_mixtral_fastest"]["median"] > 0 and "dense" in row["gflops"]
