"""The flow's data step: make data/ match data.dvc (`python -m flows.data`).

0. the configured data lives outside data/ (a real dataset on a cluster's file system): it is not
   data.dvc's, so it is used as it is (dvc.yaml depends on its files directly); it must exist;
1. up to date (`dvc status data.dvc` clean): nothing to do;
2. else `dvc pull data.dvc` from the DVC remote;
3. else, for ShapesWorld, regenerate it with the composed config's generator settings and
   `dvc commit data.dvc`, which refuses unless every file's md5 equals data.dvc's (the generator
   is deterministic); then `dvc push`, so the next clone pulls instead of regenerating.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    print(
        f"$ dvc {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}".rstrip(), flush=True
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed (exit {proc.returncode})")
    return proc


def outside_data_dir(root: str) -> bool:
    """Whether ``root`` (as the config has it, relative to the repository) is outside ``data/``."""
    data_dir = (ROOT / "data").resolve()
    path = (ROOT / root).resolve()
    return path != data_dir and data_dir not in path.parents


def main() -> int:
    data_cfg = yaml.safe_load((ROOT / "params" / "stage1.yaml").read_text())["data"]
    if outside_data_dir(str(data_cfg["root"])):
        if not (ROOT / data_cfg["root"]).is_dir():
            print(f"data: {data_cfg['root']} (data.root) does not exist")
            return 1
        print(f"data: {data_cfg['root']} is outside data/ (not versioned by data.dvc): used as it is")
        return 0
    status = dvc("status", "data.dvc", check=False)
    if status.returncode == 0 and "up to date" in status.stdout:
        print("data: up to date with data.dvc")
        return 0
    if dvc("pull", "data.dvc", check=False).returncode == 0:
        print("data: pulled from the DVC remote")
        return 0
    if data_cfg.get("name") != "shapesworld":
        print(f"data: data.dvc is not in the DVC remote and {data_cfg.get('name')!r} cannot be regenerated")
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as generator:
        yaml.safe_dump(data_cfg["generator"], generator)
        generator.flush()
        subprocess.run(
            [sys.executable, "-m", "moe_llava.cli", "data", "generate", "--out", data_cfg["root"],
             "--config", generator.name],
            cwd=ROOT, check=True,
        )  # fmt: skip
    if dvc("commit", "data.dvc", check=False).returncode != 0:
        print("data: the regenerated data differs from data.dvc (generator settings changed?)")
        return 1
    dvc("push", "data.dvc", check=False)  # best effort: a missing remote only costs a regeneration
    print("data: regenerated; md5s match data.dvc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
