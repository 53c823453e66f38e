"""The Prefect server dies (SIGKILL) while a step of a served deployment runs, and comes back on the same
port and database: the step's subprocess finishes regardless, and the flow run's outcome, its task runs
and the lines logged during the outage reach the restarted server. A real server on 127.0.0.1.

The deployment is `moe-tuning/evaluate` on an untrained tiny export: the smallest flow with a stage
subprocess (the full pipeline costs minutes here). That a re-run of `moe-tuning/full` skips every
up-to-date stage is tested end to end in test_moe_tuning.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from flows.local import free_port, healthy, stop, wait_until
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_llava.config import resolved
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.model.builder import build_image_processor
from moe_llava.paths import CONF_DIR
from moe_llava.training.run import export_stage
from tests.flows.test_moe_tuning import SHRUNK
from tests.project import clone_with_tiny_data, command_env, sh
from tests.training.conftest import shrunk_overrides

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def tiny_export(clone: Path, scratch: Path) -> Path:
    """An untrained model of the shrunk preset, exported where the deployment's `model` points."""
    overrides = [*shrunk_overrides(clone / "data" / "shapesworld", scratch), "stage=stage2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = resolved(compose("config", overrides=overrides))
    tokenizer = load_tokenizer(clone / "data" / "shapesworld" / "tokenizer")
    image_processor = build_image_processor(cfg.model.vision_tower, pretrained=False)
    export_stage(instantiate(cfg.model, tokenizer=tokenizer), tokenizer, image_processor, clone / "model")
    return clone / "model"


def until(check, what: str, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return value


def prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_server_restart_mid_step_loses_neither_the_step_nor_the_recorded_outcome(tmp_path):
    env = command_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    port = free_port(0)
    env["PREFECT_API_URL"] = api = f"http://127.0.0.1:{port}/api"
    server_cmd = prefect("server", "start", "--host", "127.0.0.1", "--port", str(port))

    def launch(argv: list[str], cwd: Path, log: str) -> subprocess.Popen:
        with open(tmp_path / log, "ab") as out:
            return subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def call(path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{api}{path}", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    server = serve = None
    try:
        server = launch(server_cmd, tmp_path, "server.log")  # starts while the clone is made
        clone = clone_with_tiny_data(tmp_path / "project", env)
        model = tiny_export(clone, tmp_path)
        wait_until(lambda: healthy(api), "the Prefect server", server)
        serve = launch([sys.executable, "-m", "flows.serve"], clone, "serve.log")
        inspect = prefect("deployment", "inspect", "moe-tuning/evaluate")
        wait_until(
            lambda: subprocess.run(inspect, cwd=clone, env=env, capture_output=True).returncode == 0,
            "the served deployments",
            serve,
        )
        params = ["-p", f"overrides={json.dumps(SHRUNK)}", "-p", f"model={model.name}"]
        created = sh(*prefect("deployment", "run", "moe-tuning/evaluate", *params), cwd=clone, env=env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)
        this_run = {"flow_run_id": {"any_": [run_id]}}

        def task_states() -> dict[str, str]:
            runs = call("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
            # A task run's state can be unset for a moment: Prefect records it from events.
            return {t["name"]: (t["state"] or {}).get("type") for t in runs}

        until(lambda: task_states().get("evaluate") == "RUNNING", "the evaluate step running", 240)
        os.killpg(server.pid, signal.SIGKILL)  # a crash: no shutdown of any kind
        server.wait(timeout=30)
        metrics = clone / "artifacts" / "evaluate" / "model" / "metrics.json"
        assert not metrics.exists() and not healthy(api)
        # The step's subprocess finishes while no server is there.
        until(metrics.is_file, "the evaluation's metrics while the server is down", 180)
        assert not healthy(api) and serve.poll() is None

        server = launch(server_cmd, tmp_path, "server.log")  # same port, same database
        wait_until(lambda: healthy(api), "the restarted Prefect server", server)
        state = until(
            lambda: (s := call(f"/flow_runs/{run_id}")["state"])["type"] in TERMINAL and s,
            "the flow run's final state after the restart",
            120,
            every=1,
        )
        assert state["type"] == "COMPLETED", state
        done = {"params": "COMPLETED", "evaluate": "COMPLETED"}
        until(lambda: task_states() == done, f"the task runs recorded as {done}", 60, every=1)

        def step_done_logged() -> bool:  # the flow process still sends the lines it could not send
            logs = call("/logs/filter", {"logs": this_run, "sort": "TIMESTAMP_DESC", "limit": 200})
            return any(re.match(r"evaluate: done in \d+ s", log["message"]) for log in logs)

        until(step_done_logged, "the step's last line, logged while the server was down", 90, every=2)
        assert 0.0 <= json.loads(metrics.read_text())["pope/mean_f1"] <= 1.0
        assert serve.poll() is None  # the process serving the deployments lived through it
        artifacts = call("/artifacts/filter", {"artifacts": this_run})
        assert "moe-tuning-summary" in {a["key"] for a in artifacts}  # made as the flow ended
    finally:
        stop(serve)
        stop(server)
