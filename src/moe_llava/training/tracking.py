"""MLflow tracking of a stage: one run per stage, nested under the pipeline's run when there is one.

Default tracking is a SQLite database in the working directory with an explicit artifact folder
next to it; ``$MLFLOW_TRACKING_URI`` (e.g. a team server) or ``logger.tracking_uri`` take over.
A stage's run id is kept in its output folder so a resumed stage logs into the same run, and a
run left RUNNING by a killed process is marked FAILED instead of lingering.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

PARENT_RUN_ENV = "MOE_LLAVA_PARENT_RUN_ID"
RUN_ID_FILE = "mlflow_run_id"
# Makes the MLflow UI open the experiment as model training (runs, charts), not as GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def tracking_uri(logger_cfg: Mapping | None = None) -> str:
    logger_cfg = logger_cfg or {}
    uri = logger_cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    db = Path(logger_cfg.get("default_sqlite_path") or "mlflow.db").resolve()
    return f"sqlite:///{db}"


def ensure_experiment(name: str, logger_cfg: Mapping | None = None, client=None) -> str:
    """Experiment id for ``name``, created with an explicit artifact location when missing.

    ``client``: an ``MlflowClient`` to use instead of the global tracking URI.
    """
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment_name: MLflow experiment {name!r} is deleted; restore it or pick another name"
            )
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:  # a kind someone chose in the UI stays
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = (logger_cfg or {}).get("artifact_location")
    if location and not client.tracking_uri.startswith(("http://", "https://", "databricks")):
        # Local SQLite stores absolute artifact paths: make the location explicit and absolute.
        location = Path(location).resolve().as_uri()
    else:
        location = None  # a tracking server decides where artifacts go
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def data_hash(dvc_file: str | Path = "data.dvc") -> str | None:
    """The md5 DVC recorded for the raw data (``data.dvc``), or None outside a DVC checkout."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat ``a.b.c`` params as MLflow accepts them (long values truncated)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


class StageRun:
    """The MLflow run of one stage (rank 0 only; other ranks hold an inert instance)."""

    def __init__(self, run_id: str | None, resumed: bool):
        self.run_id = run_id
        self.resumed = resumed

    @classmethod
    def start(
        cls,
        *,
        stage_dir: Path,
        stage: str,
        experiment_name: str,
        logger_cfg: Mapping,
        resume: bool,
        parent_run_id: str | None,
        tags: Mapping[str, Any],
        is_global_zero: bool,
    ) -> StageRun:
        if not is_global_zero:
            return cls(None, resume)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(tracking_uri(logger_cfg))
        experiment_id = ensure_experiment(experiment_name, logger_cfg)
        client = MlflowClient()
        id_file = stage_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        previous_run = _get_run(client, previous)
        system_metrics = bool(logger_cfg.get("log_system_metrics", True))
        if resume and previous_run is not None:
            run = mlflow.start_run(run_id=previous, log_system_metrics=system_metrics)
            client.set_tag(run.info.run_id, "resumed", "true")
            return cls(run.info.run_id, resumed=True)
        if previous_run is not None and previous_run.info.status == "RUNNING":
            client.set_terminated(previous, status="FAILED")  # a killed attempt that is not resumed
            client.set_tag(previous, "failure", "process died; superseded by a new run of the stage")
        parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            tags={k: str(v) for k, v in tags.items() if v is not None},
            log_system_metrics=system_metrics,
            **({"parent_run_id": parent_run_id} if parent_run_id else {}),
        )
        stage_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
        return cls(run.info.run_id, resumed=False)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_config(self, resolved_config: Mapping, config_yaml: str) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.log_text(config_yaml, "config.yaml")
        if self.resumed:  # params are immutable in MLflow and were logged by the first attempt
            return
        params = flatten_params(resolved_config)
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow's batch limit
            mlflow.log_params(dict(items[start : start + 100]))

    def log_dataset(self, path: str | Path, name: str, digest: str | None, context: str) -> None:
        """Record a data file as the run's dataset input (the Dataset column of the MLflow UI).

        ``digest``: the DVC hash of the data version (``data.dvc``) when there is one, so runs on
        the same data version show the same dataset; else MLflow's default digest.
        """
        if not self.active:
            return
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(Path(path).resolve()))
        digest = digest.removesuffix(".dir") if digest else None
        mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifacts(str(local_dir), artifact_path)

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Ends the run: FINISHED, KILLED on Ctrl-C, FAILED on any other error (which propagates)."""
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            mlflow.end_run(status=status)


def _get_run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # unknown id (e.g. another tracking server): start a new run
        return None
