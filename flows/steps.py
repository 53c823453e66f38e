"""How every flow step runs a command, and how the flow asks DVC whether a stage is up to date."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flows import PROJECT_ROOT

TAIL_LINES = 40  # of a failed step's output, in its error
PROGRESS_EVERY_S = 10.0  # one progress-bar line per this many seconds reaches the log
_PROGRESS = re.compile(r"it/s\]|s/it\]|\d+/\d+ \[")


class StepFailed(RuntimeError):
    """A step's command exited non-zero; the message names the step, its exit code and last lines."""

    def __init__(self, name: str, returncode: int, seconds: float, tail: Sequence[str]):
        super().__init__(
            f"{name} failed (exit {returncode}) after {seconds:.0f} s; its last lines:\n" + "\n".join(tail)
        )
        self.name, self.returncode = name, returncode


def python(*args: str) -> list[str]:
    """A command of this interpreter (its environment has the package, DVC and Prefect)."""
    return [sys.executable, *args]


def run_command(
    name: str,
    argv: Sequence[str],
    *,
    log: Callable[[str], Any] = print,
    env: dict[str, str] | None = None,
    cwd: Path = PROJECT_ROOT,
) -> float:
    """Run ``argv`` in ``cwd``, each line it prints to ``log`` as ``<name> | <line>``; its seconds.

    Raises :class:`StepFailed` with the last :data:`TAIL_LINES` lines when it exits non-zero.
    """
    log(f"{name}: {' '.join(argv)}")
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # `python` in dvc.yaml's commands: this interpreter's environment, whoever started the worker.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    last_progress, buffer = 0.0, b""
    # Progress bars redraw with '\r': split on both, and pass one redraw per PROGRESS_EVERY_S.
    while chunk := proc.stdout.read1(65536):
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            tail.append(line)
            if _PROGRESS.search(line):
                now = time.monotonic()
                if now - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = now
            log(f"{name} | {line}")
    if buffer.strip():
        tail.append(buffer.decode(errors="replace").rstrip())
    code = proc.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        raise StepFailed(name, code, seconds, list(tail))
    return seconds


def dvc_changes(target: str, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """What DVC would act on for ``target`` (a stage such as ``evaluate@stage3``, or ``data.dvc``):
    ``dvc status --json <target>`` through DVC's API, ``{}`` when its dependencies, parameters and
    outputs match dvc.lock (``dvc repro --single-item`` would skip it)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status(targets=[target])
