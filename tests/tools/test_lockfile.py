"""The environment lock: this environment is the lock, the lock covers pyproject.toml, the tool's checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

from tools import lockfile

ROOT = Path(__file__).resolve().parents[2]
# `make upgrade-check` runs the suite in a scratch venv installed from a scratch lock.
LOCK = Path(os.environ.get("MOE_TUNING_LOCK", ROOT / "requirements.lock"))


def test_installed_packages_equal_the_lock():
    lock = lockfile.read_lock(LOCK)
    assert len(lock) > 100  # every transitive package, not a hand-picked few
    for name in ("transformers", "lightning", "mlflow", "prefect", "dvc", "hydra-core", "fastapi", "pip"):
        assert metadata.version(name) == lock[name], name
    assert lockfile.installed_problems(lock) == []


def test_torch_is_the_makefiles_version_and_kept_out_of_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH_VERSION := (\S+)$", makefile, re.M).group(1)
    assert Version(metadata.version("torch")).base_version == pinned
    assert "torch" not in lockfile.read_lock(LOCK)


def test_every_declared_dependency_is_locked_within_its_range():
    declared = {r.name for r in lockfile.declared_requirements()}
    assert {"transformers", "mlflow", "pytest", "setuptools", "uv"} <= declared
    assert lockfile.pyproject_problems(lockfile.read_lock(LOCK)) == []
    assert lockfile.digest_problems(LOCK) == []  # resolved from this very pyproject.toml


def test_lock_has_hashes_for_every_pin():
    text = LOCK.read_text()
    pins = re.findall(r"^\S+==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert len(pins) == len(lockfile.read_lock(LOCK))


def _write(tmp_path: Path, lock: str, deps: list[str]) -> tuple[Path, Path]:
    lock_file = tmp_path / "requirements.lock"
    lock_file.write_text(lock)
    pyproject = tmp_path / "pyproject.toml"
    listed = ", ".join(f'"{d}"' for d in deps)
    pyproject.write_text(
        f'[build-system]\nrequires = ["setuptools>=77"]\n[project]\nname = "x"\ndependencies = [{listed}]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8"]\n'
    )
    return lock_file, pyproject


def test_pyproject_problems_name_missing_and_out_of_range_packages(tmp_path):
    lock_file, pyproject = _write(
        tmp_path,
        "setuptools==80.0 \\\n    --hash=sha256:00\npytest==8.1\nTransformers==5.24.0\n",
        ["transformers>=5.25,<6", "mlflow>=3.17", "torch>=2.13"],
    )
    problems = lockfile.pyproject_problems(lockfile.read_lock(lock_file), pyproject)
    assert problems == [
        "transformers<6,>=5.25 is declared in pyproject.toml but transformers==5.24.0 is locked",
        "mlflow>=3.17 is declared in pyproject.toml but not locked",
    ]


def test_check_pyproject_refuses_a_stale_lock_with_the_fix(tmp_path):
    stale = tmp_path / "stale.lock"
    stale.write_text(re.sub(r"^transformers==\S+", "transformers==4.57.6", LOCK.read_text(), flags=re.M))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/lockfile.py"), "check-pyproject", "--lock", str(stale)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "stale.lock no longer matches pyproject.toml; run `make lock`" in result.stderr
    assert "transformers==4.57.6 is locked" in result.stderr


def test_a_lock_older_than_pyproject_is_refused(tmp_path):
    lock_file, pyproject = _write(tmp_path, "# header\n#    make lock\npytest==8.1\n", ["pytest>=8"])
    assert lockfile.digest_problems(lock_file, pyproject) == [
        "requirements.lock does not record which pyproject.toml it was resolved from"
    ]
    lockfile.record_digest(lock_file, pyproject)
    lockfile.record_digest(lock_file, pyproject)  # re-recording replaces the line
    lines = lock_file.read_text().splitlines()
    assert (
        lines[2] == lockfile.DIGEST_LINE + lockfile.pyproject_digest(pyproject) and lines[3] == "pytest==8.1"
    )
    assert lockfile.digest_problems(lock_file, pyproject) == [] and lockfile.read_lock(lock_file) == {
        "pytest": "8.1"
    }
    pyproject.write_text(pyproject.read_text() + "[tool.ruff]\nline-length = 100\n")
    assert lockfile.digest_problems(lock_file, pyproject) == [
        "pyproject.toml changed after requirements.lock was resolved (its sha256 differs)"
    ]


def test_check_installed_names_each_difference(tmp_path):
    lock_file = tmp_path / "requirements.lock"
    lock_file.write_text(f"pytest==0.0.1\nno-such-package-xyz==1.0\npip=={metadata.version('pip')}\n")
    problems = lockfile.installed_problems(lockfile.read_lock(lock_file))
    assert problems == [
        "no-such-package-xyz==1.0 is locked but not installed",
        f"pytest==0.0.1 is locked but {metadata.version('pytest')} is installed",
    ]


def test_read_lock_rejects_duplicates_and_empty_files(tmp_path):
    lock_file = tmp_path / "requirements.lock"
    lock_file.write_text("a==1\nA==2\n")
    with pytest.raises(SystemExit, match="a is pinned twice"):
        lockfile.read_lock(lock_file)
    lock_file.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="no 'name==version' pins"):
        lockfile.read_lock(lock_file)


def test_diff_lists_moved_added_and_removed():
    old = {"transformers": "5.23.0", "gone": "1.0", "same": "2"}
    new = {"transformers": "5.24.0", "new": "0.1", "same": "2"}
    assert lockfile.diff(old, new) == ["  - gone 1.0", "  + new 0.1", "    transformers 5.23.0 -> 5.24.0"]
