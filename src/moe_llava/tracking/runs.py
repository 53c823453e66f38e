"""The one run lifecycle: :class:`TrackedRun`, used by every run the package opens.

It starts (or resumes) the run, nested under ``parent_run_id`` when given, and ends it exactly
once: ``FINISHED`` when the block ends, ``KILLED`` on Ctrl-C or SIGTERM, ``FAILED`` on any other
error (which propagates). A ``keep_going`` run (a training stage's) names a call the tracking store
does not take in a warning and skips it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.errors import ConfigError, Terminated
from moe_llava.tracking.server import require_server, short_error, tracking_uri

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MOE_LLAVA_PARENT_RUN_ID"  # set by the flow for every step it runs
# Makes the MLflow UI open the experiment as model training (runs, charts), not as GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
            raise ConfigError(
                "experiment_name", f"MLflow experiment {name!r} is deleted; restore it or pick another name"
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


def resolve_parent(explicit: str | None = None) -> str | None:
    """The run to nest under: ``explicit`` (a config's ``parent_run_id``), else the flow's."""
    return explicit or os.environ.get(PARENT_RUN_ENV) or None


def get_run(client, run_id: str | None):
    """The run, or None for no id or an id this tracking store does not know (another server, deleted)."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:
        return None


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat ``a.b.c`` params as MLflow accepts them (long values truncated)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit  # MLflow refuses longer values

    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= limit else text[: limit - 3] + "..."
    return flat


class TrackedRun:
    """An MLflow run this process started or resumed; a context manager that ends it exactly once.

    ``fluent`` runs are also MLflow's active run in this process (``mlflow.start_run``), for what
    needs one: system metrics, dataset inputs, ``mlflow.pyfunc.log_model``. Other runs (the flow's
    parent run, which its steps' processes nest under) are driven through the client only and leave
    MLflow's global state alone. An inert run (:meth:`inert`: tracking off, or a rank other than 0)
    accepts every call and does nothing.

    ``keep_going`` (a training stage's run): a logging call, or the end, that the tracking store does
    not take is named in a warning and in :attr:`unsent` instead of raising.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        client=None,
        resumed: bool = False,
        fluent: bool = False,
        keep_going: bool = False,
    ):
        self.run_id = run_id
        self.client = client
        self.resumed = resumed
        self.fluent = fluent
        self.keep_going = keep_going
        self.unsent: list[str] = []  # what a keep_going run could not send
        self.status: str | None = None  # how it ended
        self._sigterm_installed = False
        self._sigterm_received = False

    # ---- starting ------------------------------------------------------------------------------

    @classmethod
    def inert(cls, resumed: bool = False) -> TrackedRun:
        return cls(None, resumed=resumed)

    @classmethod
    def start(
        cls,
        *,
        run_name: str | None = None,
        experiment_name: str | None = None,
        experiment_id: str | None = None,
        logger_cfg: Mapping | None = None,
        uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        system_metrics: bool = False,
        fluent: bool = True,
        keep_going: bool = False,
    ) -> TrackedRun:
        """Start a new run (in ``experiment_id``, else ``experiment_name``, created when missing), or
        resume ``resume_run_id``. ``uri``: the tracking URI, default :func:`tracking_uri` of ``logger_cfg``.
        ``tags`` with a None value are left out. A server that does not answer is an error (:func:`require_server`)."""
        import mlflow
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        uri = uri or tracking_uri(logger_cfg)
        require_server(uri, (logger_cfg or {}).get("connect_timeout_s"))
        client = MlflowClient(tracking_uri=uri)
        if fluent:
            mlflow.set_tracking_uri(uri)
        if resume_run_id:
            if fluent:
                mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
            else:
                client.update_run(resume_run_id, status="RUNNING")
            return cls(resume_run_id, client=client, resumed=True, fluent=fluent, keep_going=keep_going)
        if experiment_id is None:
            if experiment_name is None:
                raise ValueError("TrackedRun.start: needs experiment_name, experiment_id or resume_run_id")
            experiment_id = ensure_experiment(experiment_name, logger_cfg, client)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
        if fluent:
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=run_name,
                tags=run_tags,
                log_system_metrics=system_metrics,
                **({"parent_run_id": parent_run_id} if parent_run_id else {}),
            )
        else:
            if parent_run_id:
                run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        return cls(run.info.run_id, client=client, fluent=fluent, keep_going=keep_going)

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.status is None

    # ---- logging -------------------------------------------------------------------------------

    def log_params(self, config: Mapping) -> None:
        """A nested config as flat ``a.b.c`` params; skipped for a resumed run (params are immutable
        in MLflow and were logged by the first attempt)."""
        if not self.active or self.resumed:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(config).items()]
        with self._sending(f"log {len(items)} params"):  # log_batch splits them into MLflow's batches
            self.client.log_batch(self.run_id, params=items)

    def log_config(self, resolved_config: Mapping, config_yaml: str) -> None:
        """The config as the artifact ``config.yaml`` and as params."""
        self.log_text(config_yaml, "config.yaml")
        self.log_params(resolved_config)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        with self._sending(f"log metrics {', '.join(sorted(metrics))}"):
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        if items:
            with self._sending(f"set tags {', '.join(sorted(t.key for t in items))}"):
                self.client.log_batch(self.run_id, tags=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            with self._sending(f"upload {artifact_file}"):
                self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            with self._sending(f"upload {local_dir}"):
                self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_dataset(self, path: str | Path, name: str, digest: str | None, context: str) -> None:
        """Record a data file as the run's dataset input (the Dataset column of the MLflow UI); fluent runs.

        ``digest``: the DVC hash of the data version (``data.dvc``) when there is one, so runs on
        the same data version show the same dataset; else MLflow's default digest.
        """
        if not (self.active and self.fluent):
            return
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(Path(path).resolve()))
        digest = digest.removesuffix(".dir") if digest else None
        with self._sending(f"log dataset {name}"):
            mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context)

    @contextlib.contextmanager
    def _sending(self, what: str):
        """Errors of the tracking store inside the block: raised, or for a keep_going run, warned and recorded."""
        try:
            yield
        except Exception as err:
            if not self.keep_going:
                raise
            self.unsent.append(what)
            log.warning(
                "MLflow %s, run %s: could not %s (%s); going on without it",
                self.client.tracking_uri,
                self.run_id,
                what,
                short_error(err),
            )

    # ---- ending --------------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED, KILLED); later calls do nothing."""
        if not self.active:
            return
        self.status = status
        with self._sending(f"end the run as {status}, which stays RUNNING there"):
            if self.fluent:
                import mlflow

                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status=status)
                    return
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> TrackedRun:
        self._install_sigterm()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """FINISHED; KILLED on Ctrl-C or SIGTERM; FAILED on any other error (which propagates)."""
        self._restore_sigterm()
        if exc is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if self._interrupted(exc) else "FAILED")

    def _interrupted(self, exc: BaseException) -> bool:
        if self._sigterm_received or isinstance(exc, KeyboardInterrupt):
            return True
        # Lightning turns a KeyboardInterrupt inside `fit` into `sys.exit(1)` after a graceful shutdown.
        return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm_received = True
        raise Terminated(f"signal {signum} (SIGTERM)")

    def _install_sigterm(self) -> None:
        """SIGTERM raises :class:`Terminated` inside the block, where no other handler is set (main thread)."""
        if not self.active or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:
            self._sigterm_installed = False
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
