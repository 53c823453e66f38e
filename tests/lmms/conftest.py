"""The lmms-eval tests (run in .venv-lmms): fixtures shared with the registry tests (a tiny ShapesWorld,
a scrambled tiny export whose answers differ per image, a SQLite MLflow store with a logged model),
lmms-eval pointed at a private, offline HF_HOME, and our own evaluator's answers to compare with."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# before lmms_eval (and `datasets`) read them: nothing from the hub, a cache of this run's own
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="moe-llava-lmms-hf-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import lmms_eval  # noqa: F401  (the extra must be installed: `make setup-lmms`)
import pytest

from moe_llava.evaluation.lmms_benchmark import render_shapesworld_tasks
from moe_llava.evaluation.lmms_scoring import SHAPESWORLD_IMAGES_ENV
from tests.registry import conftest as registry
from tests.training.conftest import shrunk_overrides

# The registry tests' fixtures, shared here.
registry_root = registry.registry_root
world = registry.world
tiny_export = registry.tiny_export
tracking_uri = registry.tracking_uri
logged_model = registry.logged_model
model_name = registry.model_name
make_registry = registry.make_registry

LIMIT = 4  # questions per ShapesWorld file (one batch)
BATCH = 4
POPE_SPLITS = ("random", "popular", "adversarial")


@pytest.fixture(scope="session")
def tasks_dir(world, registry_root) -> Path:
    """The shipped ShapesWorld task folder, reading the tiny world (as `eval benchmark --data-root`)."""
    os.environ[SHAPESWORLD_IMAGES_ENV] = str(world / "images")
    return render_shapesworld_tasks(world, registry_root / "lmms-tasks")


@pytest.fixture(scope="session")
def task_manager(tasks_dir):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=[str(tasks_dir)], include_defaults=False)


@pytest.fixture(scope="session")
def our_evaluation(world, tiny_export, registry_root) -> dict:
    """``moe-llava eval run`` on the first LIMIT questions of each file: its metrics and answers."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moe_llava.evaluation.runner import run_evaluation
    from moe_llava.paths import CONF_DIR

    out = registry_root / "our-eval"
    overrides = [
        *shrunk_overrides(world, registry_root),
        "stage=stage2",
        f"evaluation.model_dir={tiny_export}",
        f"evaluation.output_dir={out}",
        f"evaluation.limit={LIMIT}",
        f"evaluation.batch_size={BATCH}",
        "evaluation.mlflow=false",
        "evaluation.progress=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = run_evaluation(cfg)
    answers = {
        path.stem: {r["question_id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}
        for path in (out / "answers").glob("*.jsonl")
    }
    return {"metrics": metrics, "answers": answers}


def question_ids(path: Path, limit: int | None = None) -> list[str]:
    lines = path.read_text().splitlines()[:limit]
    return [json.loads(line)["question_id"] for line in lines]
