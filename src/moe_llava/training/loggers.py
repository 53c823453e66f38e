"""Lightning's MLflow logger, made to keep a stage training through a tracking-server outage.

A batch of metrics MLflow does not take (server down, timeout, HTTP 5xx) is kept in memory, in
order, with its step and time, and sent before the next batch once the server answers again; while
it does not, the next try waits ``retry_every_s``, doubled after each failed try up to
``MAX_WAIT_S`` (a try costs MLflow's bounded HTTP retries, ``logger.http``, which a hung server
makes long: the doubling keeps that a small share of the training time). The outage and the recovery are logged as warnings. What is still
unsent when training ends, and a run the logger could not end, are named in a warning with where
the local copy of every metric is (the CSV log): training never stops for tracking, and nothing is
dropped without a word.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from moe_llava.tracking import short_error

log = logging.getLogger(__name__)
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_WAIT_S = 600.0


class BufferedMLFlowLogger(MLFlowLogger):
    """:class:`MLFlowLogger` that buffers what the server does not take and sends it later.

    ``local_copy``: where every metric is kept as well (the stage's CSV log), for the warnings;
    ``max_buffered``: metric values kept at most (the oldest go first, counted and reported).
    """

    def __init__(
        self,
        *args,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        retry_every_s: float = 30.0,
        max_buffered: int = 200_000,
        local_copy: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, tracking_uri=tracking_uri, run_id=run_id, **kwargs)
        self.uri = tracking_uri
        self.mlflow_run_id = run_id
        self.retry_every_s = float(retry_every_s)
        self.max_buffered = int(max_buffered)
        self.local_copy = local_copy
        self.pending: list = []  # mlflow.entities.Metric, oldest first
        self.dropped = 0
        self.in_outage = False
        self.failed_tries = 0
        self._outage_step: int | None = None
        self._next_try = 0.0

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        try:
            super().log_hyperparams(params)
        except Exception as err:
            log.warning("MLflow %s: hyperparameters not logged (%s)", self.uri, short_error(err))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.pending:
            try:
                super().log_metrics(metrics, step)
                return
            except Exception as err:
                self._failed(err, step)
        self._keep(metrics, step)
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush(force=True)
        if self.pending or self.dropped:
            keys = sorted({m.key for m in self.pending})
            steps = sorted({m.step for m in self.pending})
            log.warning(
                "MLflow %s: %d metric values were not sent to run %s (%s; steps %s-%s)%s; "
                "every metric of the stage is in %s",
                self.uri,
                len(self.pending) + self.dropped,
                self.mlflow_run_id,
                ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else ""),
                steps[0] if steps else "?",
                steps[-1] if steps else "?",
                f" ({self.dropped} beyond the buffer)" if self.dropped else "",
                self.local_copy or "the stage's CSV log",
            )
        try:
            super().finalize(status)
        except Exception as err:
            log.warning(
                "MLflow %s: the logger could not end run %s (%s)",
                self.uri,
                self.mlflow_run_id,
                short_error(err),
            )

    def flush(self, force: bool = False) -> None:
        """Send the kept metrics, oldest first (``force``: whatever the wait); on failure keep the rest."""
        if not self.pending or (not force and time.monotonic() < self._next_try):
            return
        count = len(self.pending)
        try:
            while self.pending:
                self.experiment.log_batch(run_id=self.run_id, metrics=self.pending[:MAX_BATCH])
                del self.pending[:MAX_BATCH]
        except Exception as err:
            self._failed(err, None)
            return
        log.warning(
            "MLflow %s answers again: sent the %d metric values kept since step %s to run %s",
            self.uri,
            count,
            self._outage_step,
            self.mlflow_run_id,
        )
        self.in_outage, self.failed_tries = False, 0

    def _keep(self, metrics: Mapping[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending.extend(
            Metric(k, float(v), stamp, step or 0) for k, v in metrics.items() if not isinstance(v, str)
        )
        excess = len(self.pending) - self.max_buffered
        if excess > 0:
            del self.pending[:excess]
            self.dropped += excess

    def _failed(self, err: Exception, step: int | None) -> None:
        wait = min(self.retry_every_s * 2**self.failed_tries, MAX_WAIT_S)
        self.failed_tries += 1
        self._next_try = time.monotonic() + wait
        if self.in_outage:
            return
        self.in_outage, self._outage_step = True, step
        log.warning(
            "MLflow %s did not take the metrics of step %s for run %s (%s); training goes on, the "
            "metrics are kept and sent when it answers (tried again after %g s, then less and less "
            "often); all are also in %s",
            self.uri,
            step,
            self.mlflow_run_id,
            short_error(err),
            self.retry_every_s,
            self.local_copy or "the stage's CSV log",
        )
