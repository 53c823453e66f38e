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


# ---------------------------------------------------------------------- the lmms-eval lock
LMMS_LOCK = LOCK.with_name("requirements-lmms.lock")


def test_the_lmms_lock_keeps_every_main_pin_but_the_few_it_must_move():
    main, lmms = lockfile.read_lock(LOCK), lockfile.read_lock(LMMS_LOCK)
    spec = lockfile.lock_spec(LMMS_LOCK)
    assert spec.extras == ("dev", "lmms-eval") and spec.base == "requirements.lock"
    assert lockfile.base_problems(lmms, main, LOCK.name, spec) == []
    moved = {name for name in main if lmms[name] != main[name]}
    assert moved <= set(spec.may_move)
    assert Version(lmms["filelock"]) < Version("4") and Version(lmms["protobuf"]) < Version("7")
    assert "lmms-eval" in lmms and "torchvision" not in lmms and "torch" not in lmms
    assert lockfile.pyproject_problems(lmms, extras=spec.extras) == []
    assert lockfile.digest_problems(LMMS_LOCK) == []


def test_a_stale_lmms_lock_is_refused_naming_the_moved_pin(tmp_path):
    stale = tmp_path / "requirements-lmms.lock"  # checked as the lmms lock by its name
    stale.write_text(re.sub(r"^mlflow==\S+", "mlflow==3.17.0.dev0", LMMS_LOCK.read_text(), flags=re.M))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/lockfile.py"),
            "check-pyproject",
            "--lock",
            str(stale),
            "--base",
            str(LOCK),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no longer matches pyproject.toml and requirements.lock; run `make lock`" in result.stderr
    mlflow = lockfile.read_lock(LOCK)["mlflow"]
    assert f"mlflow==3.17.0.dev0 is locked but requirements.lock has mlflow=={mlflow}" in result.stderr


def test_the_layer_installs_only_what_the_lmms_lock_adds_or_moves(tmp_path):
    text = lockfile.layer_requirements(LMMS_LOCK, LOCK)
    pins = lockfile.read_lock(_written(tmp_path, text))
    main, lmms = lockfile.read_lock(LOCK), lockfile.read_lock(LMMS_LOCK)
    assert pins == {n: v for n, v in lmms.items() if main.get(n) != v}
    assert {"lmms-eval", "protobuf", "filelock"} <= set(pins) and "transformers" not in pins
    assert len(re.findall(r"^    --hash=sha256:", text, re.M)) >= len(pins)  # every pin with its hashes


def _written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "layer.txt"
    path.write_text(text)
    return path


def test_a_layer_venv_sees_the_base_venvs_packages_after_its_own(tmp_path):
    base, layer = tmp_path / "base", tmp_path / "layer"
    for venv in (base, layer):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [base / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "only_in_base.py").write_text("WHERE = 'base'\n")
    (site / "in_both.py").write_text("WHERE = 'base'\n")
    (site / "base_pth.pth").write_text(f"{tmp_path / 'extra'}\n")  # base's own .pth files still apply
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "from_pth.py").write_text("WHERE = 'pth'\n")
    lockfile.link_base(layer, base)
    layer_site = Path(
        subprocess.check_output(
            [layer / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (layer_site / "in_both.py").write_text("WHERE = 'layer'\n")
    code = "import only_in_base, in_both, from_pth; print(only_in_base.WHERE, in_both.WHERE, from_pth.WHERE)"
    out = subprocess.check_output([layer / "bin/python", "-c", code], text=True, cwd=tmp_path)
    assert out.split() == ["base", "layer", "pth"]


def test_pip_check_allows_only_what_the_lock_leaves_out():
    output = (
        "timm 1.0.31 requires torchvision, which is not installed.\n"
        "lmms-eval 0.7.3 requires torchvision, which is not installed.\n"
        "wandb 0.25.0 has requirement protobuf<7, but you have protobuf 7.36.2.\n"
        "foo 1.0 requires bar, which is not installed.\n"
    )
    assert lockfile.pip_check_problems(output, ("torchvision",)) == [
        "wandb 0.25.0 has requirement protobuf<7, but you have protobuf 7.36.2.",
        "foo 1.0 requires bar, which is not installed.",
    ]
    assert lockfile.pip_check_problems("No broken requirements found.\n", ()) == []


def test_make_lock_test_and_upgrade_check_cover_the_lmms_lock():
    def dry(target: str) -> str:
        return subprocess.run(
            ["make", "-n", "-C", str(ROOT), target, "VENV=/nonexistent-venv"], capture_output=True, text=True
        ).stdout

    assert "-o requirements-lmms.lock" in dry("lock")
    upgrade = dry("upgrade-check")
    assert "--upgrade -o .venv-upgrade/requirements-lmms.lock" in upgrade and "tests/lmms" in upgrade
    test = dry("test")
    assert "link-base .venv-lmms" in test and ".venv-lmms/bin/python -m pytest tests/lmms" in test
    assert ".venv-lmms" not in dry("run")  # make run's set-up installs the main lock only
