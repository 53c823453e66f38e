"""bench/lmms.py at a tiny size: one round, the three variants' answers equal, the ratios reported."""

from __future__ import annotations

from bench import lmms as bench_lmms


def test_the_lmms_suite_times_the_adapter_against_the_evaluator(tiny_export, world):
    result = bench_lmms.run(tiny_export, world, questions=2, batch_size=2, rounds=1, warmup=0)
    (row,) = result["rows"]
    assert set(row["questions_per_s"]) == {"evaluator", "adapter", "simple_evaluate"}
    assert row["adapter_vs_evaluator"] > 0 and row["simple_evaluate_vs_evaluator"] > 0
    assert result["config"]["moe"] is False and len(result["measurements"]) == 3
