"""The work pools' image (Dockerfile): not built here (no Docker, no CUDA wheels), but it must agree
with prefect.yaml (where the repository is) and the Makefile (the torch it installs, its set-up)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_image_holds_the_repository_where_the_container_deployments_look_for_it():
    dockerfile = (REPO / "Dockerfile").read_text()
    [workdir] = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    containers = [d for d in deployments if d["name"] in ("full-docker", "full-kubernetes")]
    assert len(containers) == 2
    for deployment in containers:
        [step] = deployment["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    # the Makefile's set-up (the lock, its checks) with the CUDA build of the Makefile's torch
    assert re.search(r"^RUN make setup TORCH_SPEC=", dockerfile, re.M)
    version = re.search(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f'TORCH_SPEC="torch=={version} --index-url https://download.pytorch.org/whl/cu' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", "artifacts/", "mlflow.db", "data/"} <= set(ignored) and ".git" not in ignored
