"""Where runs go, and whether the tracking server there answers.

Default tracking is a SQLite database in the working directory; ``logger.tracking_uri`` or
``$MLFLOW_TRACKING_URI`` (e.g. a team server) take over. A server that does not answer at the start
is a :class:`TrackingUnavailable` error within ``logger.connect_timeout_s`` (:func:`require_server`),
never a hang; a training stage bounds MLflow's HTTP retries (:func:`bound_http_retries`) so an
outage later costs seconds per call, not minutes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from moe_llava.errors import TrackingUnavailable

CONNECT_TIMEOUT_S = 10.0
# logger.http keys -> MLflow's variables. MLflow's defaults retry a dead server for minutes per call
# (7 retries, backoff factor 2, 120 s timeout): a training step would wait that long for a metric.
HTTP_LIMITS = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


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
