"""Evaluation fixtures: the training tests' tiny ShapesWorld and shrunk Hydra config, plus tiny exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_llava.model import MoELlavaForCausalLM
from moe_llava.training.run import export_stage
from tests.training import conftest as training

# The training tests' fixtures (tiny ShapesWorld, shrunk tiny_cpu config, dense export), shared here.
shapesworld = training.shapesworld
compose_stage = training.compose_stage
dense_export = training.dense_export
shrunk_overrides = training.shrunk_overrides


@pytest.fixture
def moe_export(dense_export, tmp_path) -> Path:
    """A stage-3 style export: the dense export upcycled (4 experts, top-2, layers 0 and 2), saved where
    the default ``evaluation.model_dir`` (``<run_dir>/stage3/export``) looks for it."""
    from transformers import AutoImageProcessor

    from moe_llava.data.tokenizer import load_tokenizer

    model = MoELlavaForCausalLM.from_pretrained(dense_export)
    model.upcycle(num_experts=4, top_k=2, layers="sparse", capacity_factor=1.5, eval_capacity_factor=2.0)
    export = tmp_path / "artifacts" / "stage3" / "export"
    export.parent.mkdir(parents=True)
    export_stage(
        model, load_tokenizer(dense_export), AutoImageProcessor.from_pretrained(dense_export), export
    )
    return export


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
