"""`make run`: the `moe-tuning/full` deployment end to end on this machine (`python -m flows.local`).

Uses the Prefect server at $PREFECT_API_URL when one answers there; otherwise starts one on
127.0.0.1 with its state in .prefect/. Serves the deployments (flows/serve.py), runs
`prefect deployment run moe-tuning/full --watch`, prints the run's summary, and stops what it
started, also on failure or Ctrl-C. Extra arguments are Hydra overrides for the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from flows import PROJECT_ROOT
from flows.steps import StepFailed, python, run_command
from moe_llava.pipeline.params import STAGE3_PARAMS

START_TIMEOUT_S = 120


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def free_port(preferred: int = 4200) -> int:
    """``preferred`` when nothing listens there (0: any free port)."""
    with socket.socket() as sock:
        if preferred and sock.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """A background service (a server, serve.py) in its own process group, for :func:`stop`."""
    out = open(log, "ab") if log else None  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        argv,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_until(check, what: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise SystemExit(f"make run: {what} exited (code {proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"make run: {what} not ready after {timeout:.0f} s")
        time.sleep(1)


def prefect(*args: str) -> list[str]:
    return python("-m", "prefect", *args)


def main(overrides: list[str]) -> int:
    env = {**os.environ, "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))}
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lightning.pytorch")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the local server sends no telemetry
    server = serve = None
    try:
        api_url = env.get("PREFECT_API_URL", "")
        if not (api_url and healthy(api_url)):
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            env["PREFECT_API_URL"] = api_url
            Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
            print(f"make run: starting a Prefect server on 127.0.0.1:{port} (state in {env['PREFECT_HOME']})")
            server = start(
                prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)),
                env,
                log=Path(env["PREFECT_HOME"]) / "server.log",
            )
            wait_until(lambda: healthy(api_url), "the Prefect server", server)
        env["PREFECT_API_URL"] = api_url
        print(f"make run: Prefect API {api_url}; serving the moe-tuning deployments")
        serve = start(python("-m", "flows.serve"), env)

        def deployed() -> bool:
            probe = prefect("deployment", "inspect", "moe-tuning/full")
            try:
                run_command("deployment inspect", probe, log=lambda line: None, env=env)
            except StepFailed:
                return False
            return True

        wait_until(deployed, "the deployment server (flows/serve.py)", serve)
        params = ["-p", f"overrides={json.dumps(overrides)}"] if overrides else []
        try:
            run_command(
                "moe-tuning/full",
                prefect("deployment", "run", "moe-tuning/full", "--watch", *params),
                env=env,
            )
        except StepFailed as err:
            print(f"make run: moe-tuning/full failed (exit {err.returncode})", file=sys.stderr)
            return err.returncode
        run_dir = Path(yaml.safe_load((PROJECT_ROOT / STAGE3_PARAMS).read_text())["run_dir"])
        summary = PROJECT_ROOT / run_dir / "summary.md"
        if summary.is_file():
            print("\n" + summary.read_text())
            print(
                f"Prefect UI: PREFECT_HOME={env['PREFECT_HOME']} prefect server start  (then http://127.0.0.1:4200)"
            )
        return 0
    except KeyboardInterrupt:
        print("make run: interrupted; stopping what it started (a re-run resumes)", file=sys.stderr)
        return 130
    finally:
        stop(serve)
        stop(server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
