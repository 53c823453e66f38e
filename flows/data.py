"""The flow's data step: make data/ match data.dvc (`python -m flows.data`, or :func:`sync`).

0. the configured data lives outside data/ (a real dataset on a cluster's file system): it is not
   data.dvc's, so it is used as it is (dvc.yaml depends on its files directly); it must exist;
1. up to date (DVC's status of data.dvc is clean): nothing to do;
2. else `dvc pull data.dvc` from the DVC remote;
3. else, for ShapesWorld, regenerate it with the composed config's generator settings and
   `dvc commit data.dvc`, which refuses unless every file's md5 equals data.dvc's (the generator
   is deterministic); then `dvc push`, so the next clone pulls instead of regenerating.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from typing import Any

import yaml

from flows import PROJECT_ROOT
from flows.steps import StepFailed, dvc_changes, python, run_command
from moe_llava.errors import UserError
from moe_llava.pipeline.params import params_file

OUTSIDE = "outside data/ (not versioned by data.dvc): used as it is"
UP_TO_DATE = "up to date with data.dvc"
PULLED = "pulled from the DVC remote"
REGENERATED = "regenerated; md5s match data.dvc"


class DataUnavailable(UserError):
    """The configured data is neither there, in the DVC remote, nor regenerable as data.dvc has it."""


def outside_data_dir(root: str) -> bool:
    """Whether ``root`` (as the config has it, relative to the repository) is outside ``data/``."""
    data_dir = (PROJECT_ROOT / "data").resolve()
    path = (PROJECT_ROOT / root).resolve()
    return path != data_dir and data_dir not in path.parents


def sync(log: Callable[[str], Any] = print, env: dict[str, str] | None = None) -> str:
    """Make the configured data available; which of :data:`OUTSIDE`, :data:`UP_TO_DATE`,
    :data:`PULLED`, :data:`REGENERATED` it took. Raises :class:`DataUnavailable`."""

    def dvc(name: str, *args: str) -> None:
        run_command(name, python("-m", "dvc", *args), log=log, env=env)

    data_cfg = yaml.safe_load((PROJECT_ROOT / params_file("stage1")).read_text())["data"]
    root = str(data_cfg["root"])
    if outside_data_dir(root):
        if not (PROJECT_ROOT / root).is_dir():
            raise DataUnavailable(f"{root} (data.root) does not exist")
        return f"{root} is {OUTSIDE}"
    if not dvc_changes("data.dvc"):
        return UP_TO_DATE
    try:
        dvc("dvc pull", "pull", "data.dvc")
        return PULLED
    except StepFailed:
        log("data: not in the DVC remote")
    if data_cfg.get("name") != "shapesworld":
        raise DataUnavailable(
            f"data.dvc is not in the DVC remote and {data_cfg.get('name')!r} cannot be regenerated"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as generator:
        yaml.safe_dump(data_cfg["generator"], generator)
        generator.flush()
        generate = python(
            "-m", "moe_llava.cli", "data", "generate", "--out", root, "--config", generator.name
        )
        run_command("data generate", generate, log=log, env=env)
    try:
        dvc("dvc commit", "commit", "data.dvc")
    except StepFailed as err:
        raise DataUnavailable(
            "the regenerated data differs from data.dvc (generator settings changed?)"
        ) from err
    try:
        dvc("dvc push", "push", "data.dvc")
    except StepFailed:  # best effort: a missing remote only costs a regeneration
        log("data: not pushed to the DVC remote")
    return REGENERATED


def main() -> int:
    try:
        print(f"data: {sync()}")
    except DataUnavailable as err:
        print(f"data: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
