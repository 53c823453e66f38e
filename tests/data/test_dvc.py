"""DVC: the raw dataset under data/ is tracked by data.dvc; real `dvc` commands in temp git repos."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moe_llava.data.shapesworld import generate_shapesworld
from tests.project import sh

REPO = Path(__file__).resolve().parents[2]
SMALL = {"train_images": 10, "val_images": 3, "test_images": 4, "tokenizer_vocab_size": 300}


def run(*args: str, cwd: Path, ok: bool = True) -> str:
    return sh(*args, cwd=cwd, ok=ok)


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    run("git", "init", "-q", cwd=path)
    run("dvc", "init", "-q", cwd=path)
    return path


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_repository_tracks_data_with_a_local_default_remote():
    config = (REPO / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = ~/.cache/moe-tuning/dvc-remote" in config
    assert "analytics = false" in config
    outs = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    assert [o["path"] for o in outs] == ["data"] and outs[0]["md5"].endswith(".dir")
    ignored = subprocess.run(["git", "check-ignore", "-q", "data"], cwd=REPO, check=False).returncode
    assert ignored == 0, "data/ must be ignored by git (DVC tracks it)"


def test_push_clone_pull_and_regenerate(tmp_path):
    """A fresh clone gets data/ from the remote (dvc pull) or by regenerating it (same md5s, no remote)."""
    origin = new_repo(tmp_path / "origin")
    remote = tmp_path / "remote"
    run("dvc", "remote", "add", "-d", "local", str(remote), cwd=origin)
    generate_shapesworld(origin / "data" / "shapesworld", SMALL)
    run("dvc", "add", "data", cwd=origin)
    assert (origin / "data.dvc").exists() and "/data" in (origin / ".gitignore").read_text()
    run("git", "add", ".", cwd=origin)
    run("git", "commit", "-qm", "data", cwd=origin)
    run("dvc", "push", cwd=origin)
    expected = digest(origin / "data")

    pulled = tmp_path / "pulled"
    run("git", "clone", "-q", str(origin), str(pulled), cwd=tmp_path)
    assert not (pulled / "data").exists()
    run("dvc", "pull", cwd=pulled)
    assert digest(pulled / "data") == expected

    regenerated = tmp_path / "regenerated"
    run("git", "clone", "-q", str(origin), str(regenerated), cwd=tmp_path)
    shutil.rmtree(remote)  # no remote at all: regeneration alone must reproduce data.dvc
    generate_shapesworld(regenerated / "data" / "shapesworld", SMALL)
    dvc_file = (regenerated / "data.dvc").read_text()
    # `dvc commit` refuses (without --force) when the workspace differs from data.dvc; here it
    # succeeds, fills the empty cache, and leaves data.dvc untouched: dvc status is clean
    run("dvc", "commit", "data.dvc", cwd=regenerated)
    assert (regenerated / "data.dvc").read_text() == dvc_file
    assert "up to date" in run("dvc", "status", cwd=regenerated)
    # and a real change is detected and refused
    (regenerated / "data" / "shapesworld" / "README.md").write_text("edited\n")
    assert "modified" in run("dvc", "status", cwd=regenerated)
    assert "unable to commit changed stage" in run("dvc", "commit", "data.dvc", cwd=regenerated, ok=False)


@pytest.mark.slow
def test_committed_data_dvc_is_reproduced_by_the_default_generator(tmp_path):
    """`moe-llava data generate` (defaults) rebuilds exactly the data/ recorded in data.dvc."""
    repo = new_repo(tmp_path / "clone")
    shutil.copy(REPO / "data.dvc", repo / "data.dvc")
    generate_shapesworld(repo / "data" / "shapesworld")
    run("dvc", "commit", "data.dvc", cwd=repo)  # fails if any file's md5 differs from data.dvc
    assert (repo / "data.dvc").read_bytes() == (REPO / "data.dvc").read_bytes()
    assert "up to date" in run("dvc", "status", "data.dvc", cwd=repo)
