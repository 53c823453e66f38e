"""MLflow tracking, one concern a module; every name is importable from ``moe_llava.tracking``.

- :mod:`~moe_llava.tracking.server`: where runs go (:func:`tracking_uri`: ``logger.tracking_uri``,
  ``$MLFLOW_TRACKING_URI`` or SQLite in the working directory), whether the server answers
  (:func:`require_server`, a :class:`~moe_llava.errors.TrackingUnavailable` error, never a hang) and
  MLflow's HTTP retries bounded for a training stage (:func:`bound_http_retries`);
- :mod:`~moe_llava.tracking.provenance`: :func:`provenance_tags`, what every run and registered version
  was built from (``git_commit``, ``data_hash``, ``lock_hash``, ``moe``);
- :mod:`~moe_llava.tracking.runs`: :class:`TrackedRun`, the one run lifecycle (training stages, the
  backbone step, ``eval-<stage>``, ``register`` and the flow's parent run)::

      with TrackedRun.start(run_name="eval-stage3", experiment_name="tiny-cpu", tags={...}) as run:
          run.log_params(config)
          run.log_metrics(metrics)

  ``FINISHED`` when the block ends, ``KILLED`` on Ctrl-C or SIGTERM, ``FAILED`` on any other error
  (which propagates); a ``keep_going`` run (a training stage's) goes on through a tracking outage;
- :mod:`~moe_llava.tracking.resume`: :func:`start_stage_run`, a stage's run kept in
  ``<stage_dir>/mlflow_run_id``: resumed with the stage, or marked FAILED when a killed attempt is
  superseded.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "CONNECT_TIMEOUT_S": "moe_llava.tracking.server",
    "HTTP_LIMITS": "moe_llava.tracking.server",
    "bound_http_retries": "moe_llava.tracking.server",
    "is_server": "moe_llava.tracking.server",
    "require_server": "moe_llava.tracking.server",
    "short_error": "moe_llava.tracking.server",
    "tracking_uri": "moe_llava.tracking.server",
    "LOCK_FILE": "moe_llava.tracking.provenance",
    "PROVENANCE_KEYS": "moe_llava.tracking.provenance",
    "data_hash": "moe_llava.tracking.provenance",
    "git_commit": "moe_llava.tracking.provenance",
    "lock_hash": "moe_llava.tracking.provenance",
    "provenance_tags": "moe_llava.tracking.provenance",
    "EXPERIMENT_KIND": "moe_llava.tracking.runs",
    "PARENT_RUN_ENV": "moe_llava.tracking.runs",
    "TrackedRun": "moe_llava.tracking.runs",
    "ensure_experiment": "moe_llava.tracking.runs",
    "flatten_params": "moe_llava.tracking.runs",
    "get_run": "moe_llava.tracking.runs",
    "resolve_parent": "moe_llava.tracking.runs",
    "RUN_ID_FILE": "moe_llava.tracking.resume",
    "start_stage_run": "moe_llava.tracking.resume",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
