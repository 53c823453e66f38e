"""Reproducibility on CPU: a stage run twice with one seed gives the same metrics and the same weights;
evaluation's answers do not depend on the random state (greedy decoding, no routing noise at eval)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_llava.inference import Answerer
from moe_llava.training import run_stage
from tests.conftest import multimodal_batch

TIMING = ("per_sec", "wall_time")  # the only numbers allowed to differ between two runs


def _timing(key: str) -> bool:
    return any(part in key for part in TIMING)


def _outputs(stage_dir: Path) -> dict:
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    with open(stage_dir / "logs" / "metrics.csv") as f:
        rows = [{k: v for k, v in row.items() if v != "" and not _timing(k)} for row in csv.DictReader(f)]
    return {
        "metrics": {k: v for k, v in metrics.items() if not _timing(k)},
        "curves": rows,
        "weights": load_file(stage_dir / "export" / "model.safetensors"),
    }


@pytest.mark.timeout(300)
def test_one_seed_gives_the_same_stage_and_evaluation_ignores_the_random_state(
    compose_stage, dense_export, shapesworld, tmp_path
):
    # Stage 3 upcycles (random expert noise), shuffles its data and, here, Gumbel-noises routing:
    # every source of randomness in a stage takes part.
    overrides = (f"init_from={dense_export}", "moe.second_expert_noise=true", "stage.max_steps=2")
    stage_dir = tmp_path / "artifacts" / "stage3"
    runs = []
    for seed in (42, 42, 7):
        run_stage(compose_stage("stage3", *overrides, f"seed={seed}"))
        runs.append(_outputs(stage_dir))
    first, again, other = runs
    assert first["metrics"] == again["metrics"] and first["metrics"]["global_step"] == 2
    assert first["curves"] == again["curves"] and any("moe/layer0/entropy" in row for row in first["curves"])
    assert first["weights"].keys() == again["weights"].keys()
    assert all(torch.equal(first["weights"][k], again["weights"][k]) for k in first["weights"])
    assert other["metrics"]["train/loss"] != first["metrics"]["train/loss"], "the seed must matter"

    # Evaluation of that export: routing noise is configured but training-only, and decoding is
    # greedy whatever the export's generation_config says (sampling at temperature 5 here, which
    # would give other answers under every seed).
    export = stage_dir / "export"
    assert json.loads((export / "config.json").read_text())["moe"]["second_expert_noise"] is True
    (export / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 5.0, "top_k": 0})
    )
    answerer = Answerer.from_pretrained(export, max_new_tokens=8)
    questions = [
        (image, "What shape is in the image?") for image in sorted(shapesworld.glob("images/test/*.png"))[:4]
    ]
    answers = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        answers.append(answerer.answer(questions))
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 4
    model, batch = answerer.loaded.model, multimodal_batch(answerer.loaded.model)
    assert not model.training
    assert torch.equal(*(_logits(model, batch, seed) for seed in (0, 1)))
    model.train()  # the same forward in training mode: the routing noise is real, and seeded
    assert not torch.equal(*(_logits(model, batch, seed) for seed in (0, 1)))


@torch.no_grad()
def _logits(model, batch: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(**batch).logits
