"""MLflow tracking: where runs go, and one lifecycle for every run the package opens.

Default tracking is a SQLite database in the working directory with an explicit artifact folder
next to it; ``$MLFLOW_TRACKING_URI`` (e.g. a team server) or ``logger.tracking_uri`` take over.

:class:`TrackedRun` is the one run lifecycle, used by the training stages and the backbone step
(:func:`start_stage_run`), the evaluation (``eval-<stage>``), the registration (``register``) and
the flow's parent run::

    with TrackedRun.start(run_name="eval-stage3", experiment_name="tiny-cpu", tags={...}) as run:
        run.log_params(config)
        run.log_metrics(metrics)

It starts (or resumes) the run, nested under ``parent_run_id`` when given, and ends it exactly
once: ``FINISHED`` when the block ends, ``KILLED`` on Ctrl-C or SIGTERM, ``FAILED`` on any other
error (which propagates). A run is never left ``RUNNING`` by a process that lives to see the end of
the block; one left by a process that was killed outright is marked ``FAILED`` when its stage runs
again (or resumed, when the stage resumes from its checkpoint).

A tracking server that does not answer at the start is a :class:`TrackingUnavailable` error within
``logger.connect_timeout_s`` (:func:`require_server`), never a hang. Once a training stage runs, an
outage must not stop it: the stage bounds MLflow's HTTP retries (:func:`bound_http_retries`) and its
run is ``keep_going``: a call MLflow does not take is named in a warning and skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moe_llava.errors import Terminated, TrackingUnavailable

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MOE_LLAVA_PARENT_RUN_ID"  # set by the flow for every step it runs
PARENT_TAG = "mlflow.parentRunId"
RUN_ID_FILE = "mlflow_run_id"
# Makes the MLflow UI open the experiment as model training (runs, charts), not as GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call
LOCK_FILE = "requirements.lock"
CONNECT_TIMEOUT_S = 10.0
# logger.http keys -> MLflow's variables. MLflow's defaults retry a dead server for minutes per call
# (7 retries, backoff factor 2, 120 s timeout): a training step would wait that long for a metric.
HTTP_LIMITS = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


# ---------------------------------------------------------------------------------- where runs go
def tracking_uri(logger_cfg: Mapping | None = None) -> str:
    logger_cfg = logger_cfg or {}
    uri = logger_cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    db = Path(logger_cfg.get("default_sqlite_path") or "mlflow.db").resolve()
    return f"sqlite:///{db}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def require_server(uri: str, timeout_s: float | None = None) -> None:
    """Raise :class:`TrackingUnavailable` unless the tracking server at ``uri`` answers ``/health``
    within ``timeout_s`` (one try, MLflow's TLS settings); other URIs (SQLite, Databricks) pass."""
    if not is_server(uri):
        return
    import requests
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH

    timeout_s = float(timeout_s or CONNECT_TIMEOUT_S)
    verify = MLFLOW_TRACKING_SERVER_CERT_PATH.get() or not MLFLOW_TRACKING_INSECURE_TLS.get()
    fix = "start it, or point logger.tracking_uri / $MLFLOW_TRACKING_URI at a server that runs"
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s, verify=verify)
    except requests.Timeout:
        raise TrackingUnavailable(
            uri, f"no answer within {timeout_s:g} s (logger.connect_timeout_s); {fix}"
        ) from None
    except requests.RequestException as err:
        reason = "connection refused" if "refused" in str(err).lower() else type(err).__name__
        raise TrackingUnavailable(uri, f"unreachable ({reason}); {fix}") from None
    if response.status_code >= 500:  # e.g. a proxy in front of a server that is down
        raise TrackingUnavailable(uri, f"/health answered HTTP {response.status_code}; {fix}")


def bound_http_retries(limits: Mapping | None) -> None:
    """Export ``limits`` (``logger.http``) as MLflow's ``MLFLOW_HTTP_REQUEST_*`` variables, except those
    already set (the environment wins); child processes (DDP ranks) inherit them."""
    for key, variable in HTTP_LIMITS.items():
        if limits and limits.get(key) is not None:
            os.environ.setdefault(variable, str(int(limits[key])))


def short_error(err: BaseException) -> str:
    """An MLflow client error in a few words: the network's reason when there is one
    (``[Errno 111] Connection refused``, ``Read timed out``), else its first line, shortened."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\][^'\"()]*|Read timed out|Connect(ion)? timed out", text)
    return found.group(0).strip() if found else (text.splitlines() or [type(err).__name__])[0][:200]


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


# ---------------------------------------------------------------------------------- run metadata
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


def lock_hash(lock_file: str | Path = LOCK_FILE) -> str:
    """sha256 of the dependency lock (``requirements.lock``), or ``"absent"`` where there is none."""
    path = Path(lock_file)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


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


# ---------------------------------------------------------------------------------- the lifecycle
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
                run_tags[PARENT_TAG] = parent_run_id
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
        with self._sending(f"log {len(items)} params"):
            for start in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, params=items[start : start + BATCH])

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
            for start in range(0, len(items), 1000):  # MLflow's limit on metrics per batch
                self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

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


def start_stage_run(
    *,
    stage_dir: Path,
    stage: str,
    experiment_name: str,
    logger_cfg: Mapping,
    resume: bool,
    parent_run_id: str | None,
    tags: Mapping[str, Any],
    is_global_zero: bool = True,
) -> TrackedRun:
    """The run of a training stage (or the backbone step), its id kept in ``<stage_dir>/mlflow_run_id``.

    ``resume``: log into the run of the interrupted attempt (tag ``resumed``); otherwise a run that
    attempt left RUNNING (a killed process) is marked FAILED and a new run starts, nested under
    ``parent_run_id`` or ``$MOE_LLAVA_PARENT_RUN_ID``. Ranks other than 0 get an inert run.
    The run is ``keep_going``: once started, a tracking outage does not stop the stage.
    """
    if not is_global_zero:
        return TrackedRun.inert(resumed=resume)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(logger_cfg)
    require_server(uri, logger_cfg.get("connect_timeout_s"))
    client = MlflowClient(tracking_uri=uri)
    id_file = stage_dir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.is_file() else None
    previous_run = get_run(client, previous)
    # the same logging either way: system metrics as configured, training goes on through outages
    common = {
        "logger_cfg": logger_cfg,
        "uri": uri,
        "system_metrics": bool(logger_cfg.get("log_system_metrics", True)),
        "keep_going": True,
    }
    if resume and previous_run is not None:
        run = TrackedRun.start(resume_run_id=previous, **common)
        run.set_tags({"resumed": "true"})
        return run
    if previous_run is not None and previous_run.info.status == "RUNNING":
        client.set_terminated(previous, status="FAILED")  # a killed attempt that is not resumed
        client.set_tag(previous, "failure", "process died; superseded by a new run of the stage")
    run = TrackedRun.start(
        run_name=stage,
        experiment_name=experiment_name,
        tags=tags,
        parent_run_id=resolve_parent(parent_run_id),
        **common,
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.run_id)
    return run
