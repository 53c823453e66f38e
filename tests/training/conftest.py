"""A tiny ShapesWorld corpus (generated once per session) and the real Hydra config, shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_llava.config import resolved
from moe_llava.data.shapesworld import generate_shapesworld
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.model.builder import build_image_processor
from moe_llava.paths import CONF_DIR
from moe_llava.training.run import export_stage

TINY_WORLD = {
    "train_images": 48,
    "val_images": 8,
    "test_images": 12,
    "image_size": 32,
    "instruct_per_image": 1,
    "vqa_per_image": 1,
    "tokenizer_vocab_size": 256,
}


@pytest.fixture(scope="session")
def shapesworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapesworld") / "shapesworld"
    generate_shapesworld(root, TINY_WORLD)
    return root


def shrunk_overrides(data_root: Path, run_root: Path) -> list[str]:
    """The real tiny_cpu preset, shrunk to seconds per stage.

    Stage 1 builds the recipe's towers from their config (random init) instead of loading the
    backbone step's output; tests/pretrain and the pipeline tests cover that step.
    """
    return [
        "experiment=tiny_cpu",
        "model.pretrained=false",
        f"data.root={data_root}",
        f"run_dir={run_root}/artifacts",
        f"logger.tracking_uri=sqlite:///{run_root}/mlflow.db",
        f"logger.artifact_location={run_root}/mlartifacts",
        "logger.log_system_metrics=false",
        "callbacks.router_stats.every_n_steps=1",
        "model.vision_tower.config.image_size=32",
        "model.vision_tower.config.patch_size=8",
        "model.vision_tower.config.hidden_size=32",
        "model.vision_tower.config.intermediate_size=64",
        "model.vision_tower.config.num_hidden_layers=2",
        "model.language_model.config.hidden_size=32",
        "model.language_model.config.intermediate_size=64",
        "data.max_length=1024",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        # on the command line, these win over the preset's values of every stage
        "stage.micro_batch_size=4",
        "stage.global_batch_size=8",
        "stage.max_steps=3",
        "stage.checkpoint_every_n_steps=1",
        *[
            f"backbones.{part}.{key}={value}"
            for part in ("vision", "language")
            for key, value in BACKBONE_STEPS
        ],
    ]


BACKBONE_STEPS = (("max_steps", 3), ("batch_size", 8))


@pytest.fixture
def compose_stage(shapesworld, tmp_path):
    def _compose(stage: str, *overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "config", overrides=[*shrunk_overrides(shapesworld, tmp_path), f"stage={stage}", *overrides]
            )

    return _compose


@pytest.fixture
def dense_export(compose_stage, shapesworld, tmp_path) -> Path:
    """A dense `save_pretrained` export, as stage 2 leaves it (built directly, no training)."""
    cfg = resolved(compose_stage("stage2"))
    tokenizer = load_tokenizer(shapesworld / "tokenizer")
    model = instantiate(cfg.model, tokenizer=tokenizer)
    export = tmp_path / "dense_export"
    export_stage(model, tokenizer, build_image_processor(cfg.model.vision_tower, pretrained=False), export)
    return export
