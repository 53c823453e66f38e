"""prefect.yaml: the deployments go to a process work pool (as on a GPU host) and a worker runs
them from the checkout. A real Prefect server on 127.0.0.1, `prefect deploy`, `prefect worker`."""

from __future__ import annotations

import json
import sys

import pytest
from flows.local import free_port, healthy, start, stop, wait_until

from tests.flows.test_moe_tuning import SHRUNK
from tests.project import clone_with_tiny_data, command_env, sh


def prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_the_full_pipeline(tmp_path):
    env = command_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    clone = clone_with_tiny_data(tmp_path / "project", env)
    port = free_port(0)
    env["PREFECT_API_URL"] = api = f"http://127.0.0.1:{port}/api"
    server = worker = None
    try:
        server = start(prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), env)
        wait_until(lambda: healthy(api), "the Prefect server", server)
        sh(*prefect("work-pool", "create", "gpu-process", "--type", "process"), cwd=clone, env=env)
        names = ("full", "stage3", "evaluate", "benchmark")
        deploy = prefect("--no-prompt", "deploy", *[arg for name in names for arg in ("--name", name)])
        sh(*deploy, cwd=clone, env={**env, "MOE_TUNING_DIR": str(clone)}, timeout=180)
        inspected = sh(*prefect("deployment", "inspect", "moe-tuning/full"), cwd=clone, env=env)
        assert "'work_pool_name': 'gpu-process'" in inspected and str(clone) in inspected
        for name in ("stage3", "evaluate", "benchmark"):
            assert "gpu-process" in sh(
                *prefect("deployment", "inspect", f"moe-tuning/{name}"), cwd=clone, env=env
            )

        worker = start(prefect("worker", "start", "--pool", "gpu-process"), env, log=tmp_path / "worker.log")
        params = ["-p", f"overrides={json.dumps(SHRUNK)}", "-p", "register=false"]
        out = sh(
            *prefect("deployment", "run", "moe-tuning/full", "--watch", *params),
            cwd=tmp_path,
            env=env,
            timeout=900,
        )
        assert "Completed" in out
        log = (tmp_path / "worker.log").read_text()
        for stage in ("backbones", "stage1", "stage2", "stage3", "evaluate-stage3"):
            assert f"{stage}: done in" in log
        assert (
            clone / "artifacts" / "stage3" / "eval" / "metrics.json"
        ).is_file()  # SHRUNK: run_dir=artifacts
    finally:
        stop(worker)
        stop(server)
