"""MLflow run of an evaluation: ``eval-<stage>``, beside the stage's training run.

The run goes into the training run's experiment and nests under the same parent (the pipeline
run, tag ``mlflow.parentRunId`` of the run whose id the stage folder keeps in ``mlflow_run_id``);
``parent_run_id=...`` or ``$MOE_LLAVA_PARENT_RUN_ID`` take precedence. Without a training run
(an arbitrary ``evaluation.model_dir``) it is a top-level run of ``experiment_name``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.training.tracking import (
    PARENT_RUN_ENV,
    RUN_ID_FILE,
    ensure_experiment,
    flatten_params,
    tracking_uri,
)

PARENT_TAG = "mlflow.parentRunId"


class EvalRun:
    """A started MLflow run; ``end()`` must be called (the runner does it in ``finally``)."""

    def __init__(self, run_id: str, training_run_id: str | None, parent_run_id: str | None):
        self.run_id = run_id
        self.training_run_id = training_run_id
        self.parent_run_id = parent_run_id

    @classmethod
    def start(
        cls,
        *,
        stage: str,
        stage_dir: Path,
        experiment_name: str,
        logger_cfg: Mapping,
        parent_run_id: str | None,
        tags: Mapping[str, Any],
    ) -> EvalRun:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(tracking_uri(logger_cfg))
        client = MlflowClient()
        id_file = stage_dir / RUN_ID_FILE
        training_run_id = id_file.read_text().strip() if id_file.is_file() else None
        training_run = None
        if training_run_id:
            try:
                training_run = client.get_run(training_run_id)
            except Exception:  # another tracking server, or a deleted run
                training_run = None
        if training_run is not None:
            experiment_id = training_run.info.experiment_id
            inherited_parent = training_run.data.tags.get(PARENT_TAG)
        else:
            experiment_id = ensure_experiment(experiment_name, logger_cfg)
            inherited_parent = None
        parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or inherited_parent or None
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
        if training_run is not None:
            all_tags["training_run_id"] = training_run.info.run_id
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"eval-{stage}",
            tags=all_tags,
            log_system_metrics=False,
            **({"parent_run_id": parent} if parent else {}),
        )
        return cls(run.info.run_id, training_run.info.run_id if training_run else None, parent)

    def log_params(self, config: Mapping) -> None:
        import mlflow

        items = list(flatten_params(config).items())
        for start in range(0, len(items), 100):  # MLflow's batch limit
            mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.end_run(status=status)
