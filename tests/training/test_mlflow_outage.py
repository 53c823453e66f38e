"""A tracking server that is down at the start, or goes down while a stage trains (real `mlflow server`).

Down at the start: an error naming the URI within ``logger.connect_timeout_s``, before any work.
During a stage: the server is reached through a loopback TCP relay the test takes down (the port
refuses connections and open ones are cut, as when the server stops) and brings back; the stage
must train, export and complete, and every metric must reach MLflow once it is back, or be named
in a warning with the local copy when it never comes back.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import pytest
from flows.local import free_port, healthy, start, stop, wait_until
from mlflow.tracking import MlflowClient

from moe_llava.cli import main
from moe_llava.errors import TrackingUnavailable
from moe_llava.evaluation.runner import run_evaluation
from moe_llava.tracking import RUN_ID_FILE, TrackedRun
from moe_llava.training import run_stage
from tests.project import command_env


class Relay:
    """A loopback TCP relay to ``upstream_port`` that can be taken down (nothing listens, open
    connections are cut) and brought back on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port(0)
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            for conn in self.connections:
                _close(conn)
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            with self.lock:
                self.connections |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port(0)
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip
    # No job runner: it is for GenAI jobs, and starts a pool of processes.
    server = start(argv, command_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), log=root / "server.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(base), "mlflow server", server, timeout=180)
        yield base
    finally:
        stop(server)


@pytest.fixture
def relay(mlflow_server):
    relay = Relay(int(mlflow_server.rsplit(":", 1)[1]))
    try:
        yield relay
    finally:
        relay.down()


@pytest.fixture
def fast_mlflow_failures(monkeypatch):
    """A refused connection fails a call at once (one retry, no backoff); the stage's own bounds apply
    only where these are not set."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Outage(L.Callback):
    """Takes the relay down when ``global_step`` reaches ``down_at`` and back at ``up_at`` (None: never).

    Lightning logs a step's loss after the batch-end hooks: going down at ``global_step`` n loses
    the metrics of step n - 1 on."""

    def __init__(self, relay: Relay, down_at: int, up_at: int | None):
        self.relay, self.down_at, self.up_at = relay, down_at, up_at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.down_at and self.relay.listener is not None:
            self.relay.down()
        if trainer.global_step == self.up_at and self.relay.listener is None:
            self.relay.up()


def _csv_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    history = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    history[key].append((int(row["step"]), float(value)))
    return history


def _mlflow_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_a_tracking_server_down_at_the_start_is_a_clear_error_within_the_timeout(
    compose_stage, tmp_path, server, capsys
):
    # "silent": the port accepts connections (the kernel's backlog) and never answers, like a hung server.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1] if server == "silent" else free_port(0)
        uri = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable) as error:
            run_stage(compose_stage("stage1", f"logger.tracking_uri={uri}", "logger.connect_timeout_s=2"))
        elapsed = time.monotonic() - started
        reason = "no answer within 1 s" if server == "silent" else "connection refused"
        with pytest.raises(TrackingUnavailable, match=reason):  # a run of an evaluation, a registration
            TrackedRun.start(
                run_name="eval-stage3", experiment_name="x", uri=uri, logger_cfg={"connect_timeout_s": 1}
            )
        with pytest.raises(TrackingUnavailable, match=reason):  # evaluating a registry model
            run_evaluation(
                compose_stage(
                    "stage3", f"logger.tracking_uri={uri}", "logger.connect_timeout_s=1",
                    "evaluation.model_dir=models:/moe-llava@champion",
                )
            )  # fmt: skip
        code = main(["registry", "show", "--tracking-uri", uri, "-o", "logger.connect_timeout_s=1"])
        assert code == 2 and f"MLflow tracking server {uri}: " in capsys.readouterr().err
    message = str(error.value)
    assert message.startswith(f"MLflow tracking server {uri}: ") and "logger.tracking_uri" in message
    assert ("no answer within 2 s" if server == "silent" else "connection refused") in message
    assert elapsed < 15, f"took {elapsed:.1f} s"  # 2 s of waiting, plus composing the config
    assert not (tmp_path / "artifacts" / "stage1").exists(), "nothing ran before the check"


@pytest.mark.timeout(300)
def test_a_stage_trains_through_an_outage_and_mlflow_gets_every_metric_back(
    compose_stage, relay, fast_mlflow_failures, tmp_path, caplog
):
    uri = f"http://127.0.0.1:{relay.port}"
    overrides = [f"logger.tracking_uri={uri}", "logger.loggers.mlflow.retry_every_s=0", "stage.max_steps=4"]
    stage_dir = tmp_path / "artifacts" / "stage1"
    csv_log = stage_dir / "logs" / "metrics.csv"
    client = MlflowClient(uri)

    # Down from step 1's metrics to step 3's: those of steps 1-2 wait in the buffer and go with step 3's.
    with caplog.at_level(logging.WARNING):
        result = run_stage(compose_stage("stage1", *overrides), callbacks=[Outage(relay, 2, 4)])
    assert result["global_step"] == 4 and (stage_dir / "COMPLETED").is_file()
    assert (stage_dir / "export" / "model.safetensors").is_file()
    warnings = caplog.text
    assert f"MLflow {uri} did not take the metrics of step 1" in warnings and str(csv_log) in warnings
    assert f"MLflow {uri} answers again: sent the" in warnings
    run_id = (stage_dir / RUN_ID_FILE).read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "export" in {a.path for a in client.list_artifacts(run_id)}
    local = _csv_history(csv_log)
    assert {step for step, _ in local["train/loss"]} == {0, 1, 2, 3}
    for key, values in local.items():  # every value at its step; the series once (the summary adds lr-AdamW)
        sent = _mlflow_history(client, run_id, key)
        assert not Counter(values) - Counter(sent), f"{key}: not in MLflow"
        if "/" in key:
            assert sorted(sent) == sorted(values), key

    # Down from step 1's metrics for good: the stage still completes; what MLflow lacks is named, with the copy.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run_stage(compose_stage("stage1", *overrides), callbacks=[Outage(relay, 2, None)])
    assert result["global_step"] == 4 and (stage_dir / "COMPLETED").is_file()
    assert (stage_dir / "export" / "model.safetensors").is_file() and (stage_dir / "metrics.json").is_file()
    second_id = (stage_dir / RUN_ID_FILE).read_text()
    warnings = caplog.text
    assert f"metric values were not sent to run {second_id} (" in warnings and "steps 1-3" in warnings
    assert f"every metric of the stage is in {csv_log}" in warnings
    assert f"run {second_id}: could not end the run as FINISHED, which stays RUNNING there" in warnings
    assert "[Errno 111] Connection refused" in warnings  # the reason, in a few words
    assert f"stage stage1 is complete in {stage_dir}" in warnings and "upload " in warnings
    relay.up()
    run = client.get_run(second_id)
    assert run.info.status == "RUNNING"  # as reported; the stage's next run marks it FAILED
    assert {step for step, _ in _mlflow_history(client, second_id, "train/loss")} == {0}
    assert {step for step, _ in _csv_history(csv_log)["train/loss"]} == {0, 1, 2, 3}
