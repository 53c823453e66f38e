"""A git clone of this repository on a tiny ShapesWorld, as the pipeline and flow tests run it.

Commands run with this interpreter's environment first on PATH (``python`` in dvc.yaml), DVC's
analytics off, a git identity, and none of the variables that would point the clone at another
Prefect server, MLflow store or pipeline run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moe_llava.data.shapesworld import generate_shapesworld
from tests.training.conftest import TINY_WORLD, shrunk_overrides

REPO = Path(__file__).resolve().parents[1]
NOT_INHERITED = (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",  # mlflow.set_tracking_uri exports it to every later subprocess
    "MOE_LLAVA_PARENT_RUN_ID",
    "MOE_LLAVA_CONF_DIR",
)
# shrunk_overrides' absolute paths, replaced by paths relative to the clone (where commands run)
PATH_KEYS = ("data.root=", "run_dir=", "logger.tracking_uri=", "logger.artifact_location=")
RELATIVE_PATHS = [
    "data.root=data/shapesworld",
    "run_dir=artifacts",
    "logger.tracking_uri=sqlite:///mlflow.db",
    "logger.artifact_location=mlartifacts",
]


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # loopback only: no telemetry from test servers
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    env.update(extra)
    return env


# On a machine shared with other work, every command timeout scaled by $MOE_TUNING_TIMEOUT_SCALE.
TIMEOUT_SCALE = float(os.environ.get("MOE_TUNING_TIMEOUT_SCALE", "1"))


def sh(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120, ok: bool = True) -> str:
    """Run a command (``dvc ...`` through this interpreter); assert its exit status; stdout + stderr."""
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env or command_env(),
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT_SCALE,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert (proc.returncode == 0) == ok, (
        f"{cmd}: rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def clone_with_tiny_data(path: Path, env: dict | None = None) -> Path:
    """``git clone`` of the committed repository whose data.dvc tracks a tiny ShapesWorld (committed)."""
    sh("git", "clone", "-q", str(REPO), str(path), cwd=path.parent, env=env)
    generate_shapesworld(path / "data" / "shapesworld", TINY_WORLD)
    sh("dvc", "add", "-q", "data", cwd=path, env=env)
    sh("git", "commit", "-qam", "tiny data", cwd=path, env=env)
    return path


def clone_overrides() -> list[str]:
    """The training tests' shrunk tiny_cpu preset, with paths relative to the clone; stage 1 loads the
    backbone step's towers, as `make run` does."""
    shrunk = shrunk_overrides(Path("/unused"), Path("/unused"))
    kept = [o for o in shrunk if not o.startswith(PATH_KEYS) and o != "model.pretrained=false"]
    assert len(kept) == len(shrunk) - len(PATH_KEYS) - 1
    return [*kept, *RELATIVE_PATHS]
