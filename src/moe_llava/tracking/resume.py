"""The resume policy of a stage's run: log into the interrupted attempt's run, or supersede it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.tracking.runs import TrackedRun, get_run, resolve_parent
from moe_llava.tracking.server import require_server, tracking_uri

RUN_ID_FILE = "mlflow_run_id"


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
