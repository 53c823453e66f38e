"""A tiny real export (no training), a real SQLite MLflow store in a temp dir, one logged pyfunc model.

Everything heavy is built once per session: the export (weights scrambled so that answers depend
on the image), the direct :class:`Answerer` on it, the tracking store and a logged pyfunc model
from which any number of registry versions are created (same weights, different metrics: each
version gets a logged model of its own, :func:`new_model`, since a version's metrics are its model's).
Each test registers under its own model name, so tests do not see each other's versions.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_llava.config import resolved
from moe_llava.data.shapesworld import generate_shapesworld
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.inference import Answerer
from moe_llava.model.builder import build_image_processor
from moe_llava.paths import CONF_DIR
from moe_llava.registry.gate import GateSettings
from moe_llava.registry.registry import CHAMPION, ModelRegistry
from moe_llava.training.run import export_stage
from tests.training.conftest import TINY_WORLD, shrunk_overrides

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet test logs

EXPERIMENT = "registry-tests"
MAX_NEW_TOKENS = 6
# Request limits the logged model is given: small, so that tests can exceed them cheaply.
LIMITS = {"max_rows": 4, "max_image_bytes": 100_000}


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def world(registry_root) -> Path:
    root = registry_root / "shapesworld"
    generate_shapesworld(root, TINY_WORLD)
    return root


@pytest.fixture(scope="session")
def tiny_export(world, registry_root) -> Path:
    """A dense stage export built from the tiny recipe (no training); weights scrambled with a fixed
    seed so that greedy answers differ between images (an untrained model answers ':::' to all)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*shrunk_overrides(world, registry_root), "stage=stage2"])
    cfg = resolved(cfg)
    tokenizer = load_tokenizer(world / "tokenizer")
    torch.manual_seed(0)
    model = instantiate(cfg.model, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5, generator=generator)
    export = registry_root / "export"
    export_stage(model, tokenizer, build_image_processor(cfg.model.vision_tower, pretrained=False), export)
    return export


@pytest.fixture(scope="session")
def answerer(tiny_export) -> Answerer:
    """The model used directly: what every other path (pyfunc, REST, chat) must agree with."""
    return Answerer.from_pretrained(tiny_export, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="session")
def images(world) -> list[Path]:
    return sorted((world / "images" / "test").glob("*.png"))[:3]


@pytest.fixture(scope="session")
def tracking_uri(registry_root) -> str:
    uri = f"sqlite:///{registry_root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(EXPERIMENT, artifact_location=(registry_root / "mlartifacts").as_uri())
    return uri


@pytest.fixture(scope="session")
def logged_model(tracking_uri, tiny_export):
    """One pyfunc model logged in a run: versions of any registered model can point at it."""
    from moe_llava.registry.model import log_pyfunc_model

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="logged-model") as run:
        info = log_pyfunc_model(tiny_export, pyfunc_config={"max_new_tokens": MAX_NEW_TOKENS, **LIMITS})
    return {"model_uri": info.model_uri, "run_id": run.info.run_id, "model_id": info.model_id}


def new_model(logged_model, tracking_uri: str | None = None) -> dict[str, str]:
    """A logged model of its own for one version (a version's metrics are its logged model's) on the
    run of ``logged_model``, without files (the gate and the aliases never load them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(logged_model["run_id"])
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run.info.run_id)
    return {"model_uri": f"models:/{model.model_id}", "run_id": run.info.run_id, "model_id": model.model_id}


@pytest.fixture
def model_name(request) -> str:
    """A registered model name of this test's own (tests share one store)."""
    return "t-" + re.sub(r"[^a-zA-Z0-9-]+", "-", request.node.name).strip("-")[:80]


@pytest.fixture
def make_registry(tracking_uri, model_name):
    def _make(**gate) -> ModelRegistry:
        return ModelRegistry(model_name, GateSettings(**gate), tracking_uri=tracking_uri)

    return _make


class ChampionWatch:
    """Asserts, after every call, that a registry that once had a champion still has one."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.had_champion = registry.exists() and registry.champion() is not None

    def check(self) -> str | None:
        champion = self.registry.champion()
        if self.had_champion:
            assert champion is not None, "the registry lost its champion"
        self.had_champion = self.had_champion or champion is not None
        return champion

    def __call__(self, method: str, *args, **kwargs):
        try:
            return getattr(self.registry, method)(*args, **kwargs)
        finally:
            self.check()


def aliases_of(registry: ModelRegistry, version: str) -> set[str]:
    return {alias for alias, v in registry.aliases().items() if v == str(version)}


def image_base64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


__all__ = ["CHAMPION", "LIMITS", "ChampionWatch", "aliases_of", "image_base64"]
