"""The environment lock (`requirements.lock`): make it, check it, compare it.

    python tools/lockfile.py compile [--upgrade] [-o FILE]   # `make lock` / `make upgrade-check`
    python tools/lockfile.py check-pyproject                 # every declared dependency locked, in range
    python tools/lockfile.py check-installed                 # this interpreter's packages == the lock
    python tools/lockfile.py diff OLD NEW                    # which packages moved

The lock pins every package of the CPU environment (CPython 3.11, Linux x86-64) with hashes, the
`dev` extra, the build backend and pip included, except torch: the Makefile installs torch first
(``TORCH_SPEC``, the CPU build by default, a CUDA build on GPU machines) and the lock is then
installed with ``--no-deps``. The lock is resolved against the CPU torch's metadata, so it holds
no CUDA runtime packages. `uv` resolves; it does not read pip's configuration, so the wheel
folders pip is configured with (``find-links``: where the CPU torch wheel lies on these machines)
are handed to it explicitly.

The lock records the sha256 of the pyproject.toml it was resolved from, so a pyproject.toml edited
after the lock was made is caught at set-up (``check-pyproject``), not months later.

Needs only the standard library and ``packaging`` (run it with the project's venv python).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
# Installed by the Makefile before the lock, never written into it (see the module docstring).
NOT_LOCKED = ("torch",)
LOCKED_PYTHON = "3.11"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
DIGEST_LINE = "# resolved from pyproject.toml sha256: "


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            if name in pins:
                raise SystemExit(f"{path}:{number}: {name} is pinned twice")
            pins[name] = match.group(2)
    if not pins:
        raise SystemExit(f"{path}: no 'name==version' pins found")
    return pins


def declared_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The project's dependencies, its ``dev`` extra and its build requirements."""
    data = tomllib.loads(pyproject.read_text())
    declared = [
        *data["project"]["dependencies"],
        *data["project"].get("optional-dependencies", {}).get("dev", []),
        *data.get("build-system", {}).get("requires", []),
    ]
    return [Requirement(spec) for spec in declared]


def pyproject_digest(pyproject: Path = PYPROJECT) -> str:
    return hashlib.sha256(pyproject.read_bytes()).hexdigest()


def recorded_digest(lock_path: Path) -> str | None:
    """The pyproject.toml digest the lock was resolved from (None: not recorded)."""
    for line in lock_path.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE) :].strip()
    return None


def record_digest(lock_path: Path, pyproject: Path = PYPROJECT) -> None:
    """Write the digest line under the lock's header comment (uv rewrites the file on every compile)."""
    lines = [line for line in lock_path.read_text().splitlines() if not line.startswith(DIGEST_LINE)]
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(header, DIGEST_LINE + pyproject_digest(pyproject))
    lock_path.write_text("\n".join(lines) + "\n")


def digest_problems(lock_path: Path, pyproject: Path = PYPROJECT) -> list[str]:
    recorded = recorded_digest(lock_path)
    if recorded == pyproject_digest(pyproject):
        return []
    if recorded is None:
        return [f"{lock_path.name} does not record which pyproject.toml it was resolved from"]
    return [f"pyproject.toml changed after {lock_path.name} was resolved (its sha256 differs)"]


def pyproject_problems(lock: dict[str, str], pyproject: Path = PYPROJECT) -> list[str]:
    """Declared dependencies that the lock lacks or pins outside their range."""
    problems = []
    for req in declared_requirements(pyproject):
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED:
            continue
        if name not in lock:
            problems.append(f"{req} is declared in pyproject.toml but not locked")
        elif not req.specifier.contains(Version(lock[name]), prereleases=True):
            problems.append(f"{req} is declared in pyproject.toml but {name}=={lock[name]} is locked")
    return problems


def installed_problems(lock: dict[str, str]) -> list[str]:
    """Locked packages missing from, or at another version in, the running interpreter's environment."""
    problems = []
    for name, version in sorted(lock.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is locked but not installed")
            continue
        if Version(installed) != Version(version):
            problems.append(f"{name}=={version} is locked but {installed} is installed")
    return problems


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human-readable lines for every package added, removed or moved between two locks."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None:
            lines.append(f"  + {name} {after}")
        elif after is None:
            lines.append(f"  - {name} {before}")
        else:
            lines.append(f"    {name} {before} -> {after}")
    return lines


def pip_find_links() -> list[str]:
    """The ``find-links`` locations from pip's configuration (files and ``PIP_FIND_LINKS``)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    found: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            found += shlex.split(value.strip().strip("'\""))
    found += os.environ.get("PIP_FIND_LINKS", "").split()
    return list(dict.fromkeys(found))


def compile_lock(output: Path, torch: str, upgrade: bool) -> None:
    """Resolve the lock with uv (keeping the pins already in ``output`` unless ``upgrade``)."""
    # Build backend and installer are locked too: set-up installs the project without build isolation.
    extra_inputs = [*tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"], "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        # torch is resolved at the pinned CPU build (its metadata lists no CUDA packages), not emitted.
        constraint = Path(tmp, "torch-constraint.txt")
        constraint.write_text(torch + "\n")
        cmd = [
            sys.executable, "-m", "uv", "pip", "compile", str(PYPROJECT), "-",
            "--extra", "dev",
            "--constraint", str(constraint),
            "--generate-hashes",
            "--python-version", LOCKED_PYTHON,
            "--python-platform", "x86_64-unknown-linux-gnu",
            "--custom-compile-command", "make lock",
            "--output-file", str(output),
            *[arg for name in NOT_LOCKED for arg in ("--no-emit-package", name)],
            *[arg for link in pip_find_links() for arg in ("--find-links", link)],
            *(["--upgrade"] if upgrade else []),
        ]  # fmt: skip
        subprocess.run(cmd, input="\n".join(extra_inputs) + "\n", text=True, check=True, cwd=ROOT)
    record_digest(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="resolve the lock with uv")
    comp.add_argument("-o", "--output", type=Path, default=LOCK)
    comp.add_argument("--torch", default="torch==2.13.0+cpu", help="the torch build to resolve against")
    comp.add_argument("--upgrade", action="store_true", help="newest allowed versions, not the locked ones")
    pyp = sub.add_parser("check-pyproject", help="every declared dependency is locked within its range")
    pyp.add_argument("--lock", type=Path, default=LOCK)
    inst = sub.add_parser("check-installed", help="the running environment equals the lock")
    inst.add_argument("--lock", type=Path, default=LOCK)
    dif = sub.add_parser("diff", help="packages that moved between two locks")
    dif.add_argument("old", type=Path)
    dif.add_argument("new", type=Path)
    args = parser.parse_args(argv)

    if args.command == "compile":
        compile_lock(args.output.resolve(), args.torch, args.upgrade)
        return 0
    if args.command == "diff":
        lines = diff(read_lock(args.old), read_lock(args.new))
        print("\n".join(lines) if lines else "  (no package moved)")
        return 0
    if args.command == "check-pyproject":
        problems = pyproject_problems(read_lock(args.lock)) + digest_problems(args.lock)
        hint = f"{args.lock.name} no longer matches pyproject.toml; run `make lock` and commit both"
    else:
        problems = installed_problems(read_lock(args.lock))
        hint = f"this environment differs from {args.lock.name}; run `make setup` (or `make clean setup`)"
    if problems:
        print(f"error: {hint}:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
