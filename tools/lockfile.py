"""The environment locks (`requirements.lock`, `requirements-lmms.lock`): make, check, compare them.

    python tools/lockfile.py compile [--upgrade] [-o FILE] [--base LOCK]  # `make lock` / `make upgrade-check`
    python tools/lockfile.py check-pyproject [--lock FILE]  # declared dependencies locked, in range
    python tools/lockfile.py check-installed [--lock FILE]  # this interpreter's packages == the lock
    python tools/lockfile.py layer --lock FILE -o OUT       # the pins a layer over the base venv adds
    python tools/lockfile.py link-base LAYER_VENV BASE_VENV # LAYER sees BASE's packages (a .pth file)
    python tools/lockfile.py pip-check [--lock FILE]        # `pip check` but for what the lock leaves out
    python tools/lockfile.py diff OLD NEW                   # which packages moved

Two locks: ``requirements.lock`` (the project and its ``dev`` extra: what ``make run`` and
``make test`` install into ``.venv``) and ``requirements-lmms.lock`` (that plus the ``lmms-eval``
extra, for ``.venv-lmms``). The second is resolved *against* the first: every package of the main
lock keeps its pin there, except the few in :data:`LOCKS` ``may_move`` (each with why), so that
``.venv-lmms`` can be a thin layer over ``.venv`` (``layer``) and a benchmark evaluates the very
code and libraries that were trained with. A lock is named by its file name (a scratch copy in
``.venv-upgrade/`` is checked as the lock of the same name).

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
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
LMMS_LOCK = ROOT / "requirements-lmms.lock"
PYPROJECT = ROOT / "pyproject.toml"


@dataclass(frozen=True)
class LockSpec:
    """What a lock holds: the project's extras, and the lock it keeps the pins of (None: none)."""

    extras: tuple[str, ...]
    base: str | None = None
    # base-lock packages this lock may pin at another version: name -> why
    may_move: dict[str, str] = field(default_factory=dict)
    # resolved but not written (installed by the Makefile, matching the torch build): name -> why
    not_locked: dict[str, str] = field(default_factory=dict)


LOCKS = {
    "requirements.lock": LockSpec(extras=("dev",)),
    "requirements-lmms.lock": LockSpec(
        extras=("dev", "lmms-eval"),
        base="requirements.lock",
        may_move={
            "protobuf": "lmms-eval pins wandb==0.25.0, which needs protobuf<7 (the main lock has 7.x)",
            "filelock": "lmms-eval's evaluator imports filelock._api, which filelock 4.x lacks",
        },
        not_locked={
            # lmms-eval and timm declare it; only lmms-eval's adapters for other models import it.
            "torchvision": "PyPI's wheel is a CUDA build: on the CPU torch `import torchvision` fails "
            "(operator torchvision::nms does not exist), and transformers' image processors import it "
            "when installed; GPU users install the build matching theirs (TORCHVISION_SPEC)",
        },
    ),
}


def lock_spec_not_locked(extras: tuple[str, ...]) -> dict[str, str]:
    """What a lock with these extras leaves out besides torch."""
    return next((spec.not_locked for spec in LOCKS.values() if spec.extras == tuple(extras)), {})


def lock_spec(lock_path: Path) -> LockSpec:
    """The spec of a lock file, by its name (any other name: the main lock's)."""
    return LOCKS.get(Path(lock_path).name, LOCKS["requirements.lock"])


def base_lock(lock_path: Path, base: Path | None = None) -> Path | None:
    """The lock ``lock_path`` is resolved against: ``base`` if given, else the spec's, beside the repo."""
    spec = lock_spec(lock_path)
    if spec.base is None:
        return None
    return base if base is not None else ROOT / spec.base


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


def declared_requirements(
    pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ("dev",)
) -> list[Requirement]:
    """The project's dependencies, the given extras (default: ``dev``) and its build requirements."""
    data = tomllib.loads(pyproject.read_text())
    optional = data["project"].get("optional-dependencies", {})
    missing = [extra for extra in extras if extra not in optional]
    if missing:
        raise SystemExit(f"{pyproject}: no optional-dependencies {missing}")
    declared = [
        *data["project"]["dependencies"],
        *[spec for extra in extras for spec in optional[extra]],
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


def pyproject_problems(
    lock: dict[str, str], pyproject: Path = PYPROJECT, extras: tuple[str, ...] = ("dev",)
) -> list[str]:
    """Declared dependencies (with ``extras``) that the lock lacks or pins outside their range."""
    problems = []
    for req in declared_requirements(pyproject, extras):
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED or name in lock_spec_not_locked(extras):
            continue
        if name not in lock:
            problems.append(f"{req} is declared in pyproject.toml but not locked")
        elif not req.specifier.contains(Version(lock[name]), prereleases=True):
            problems.append(f"{req} is declared in pyproject.toml but {name}=={lock[name]} is locked")
    return problems


def base_problems(lock: dict[str, str], base: dict[str, str], base_name: str, spec: LockSpec) -> list[str]:
    """Pins of the base lock that this lock lacks or moved (other than the spec's ``may_move``)."""
    problems = []
    for name, version in sorted(base.items()):
        if name in spec.may_move:
            continue
        if name not in lock:
            problems.append(f"{name}=={version} is in {base_name} but not in this lock")
        elif Version(lock[name]) != Version(version):
            problems.append(f"{name}=={lock[name]} is locked but {base_name} has {name}=={version}")
    return problems


def lock_blocks(path: Path) -> dict[str, str]:
    """``{canonical name: the pin's lines (pin, hashes, comments)}`` of a uv-written lock."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = blocks.setdefault(canonicalize_name(match.group(1)), [])
            current.append(line)
        elif current is not None and line.startswith(" "):
            current.append(line)
        else:
            current = None
    return {name: "\n".join(lines) + "\n" for name, lines in blocks.items()}


def layer_requirements(lock_path: Path, base_path: Path) -> str:
    """The requirements (with hashes) that a venv layered over the base lock's venv must add: the
    pins of ``lock_path`` that the base lock lacks or pins at another version."""
    base = read_lock(base_path)
    lock = read_lock(lock_path)
    blocks = lock_blocks(lock_path)
    return "".join(blocks[name] for name in sorted(lock) if base.get(name) != lock[name])


BASE_PTH = "_moe_tuning_base.pth"


def link_base(layer: Path, base: Path) -> Path:
    """Make the venv ``layer`` see the packages of the venv ``base`` after its own: a ``.pth`` line
    that adds base's site-packages (and runs its ``.pth`` files, e.g. the editable install's).
    The layer's own packages (the pins that differ) come first on ``sys.path`` and win."""
    import sysconfig

    def purelib(venv: Path) -> Path:
        return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))

    target = purelib(base.resolve())
    if not target.is_dir():
        raise SystemExit(f"{base}: no site-packages at {target} (set up the base venv first)")
    pth = purelib(layer.resolve()) / BASE_PTH
    pth.parent.mkdir(parents=True, exist_ok=True)
    pth.write_text(f"import site; site.addsitedir({str(target)!r})\n")
    return pth


def pip_check_problems(output: str, missing_ok: tuple[str, ...]) -> list[str]:
    """The lines of ``pip check``'s output that are problems: all but "X requires NAME, which is not
    installed." for a NAME in ``missing_ok`` (a package the lock deliberately leaves out)."""
    allowed = {canonicalize_name(name) for name in missing_ok}
    problems = []
    for line in output.splitlines():
        match = re.match(r"^\S+ \S+ requires (\S+), which is not installed\.$", line.strip())
        if line.strip() in ("", "No broken requirements found.") or (
            match and canonicalize_name(match.group(1)) in allowed
        ):
            continue
        problems.append(line.strip())
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


def compile_lock(output: Path, torch: str, upgrade: bool, base: Path | None = None) -> None:
    """Resolve the lock with uv (keeping the pins already in ``output`` unless ``upgrade``).

    A lock with a base (``requirements-lmms.lock``) is resolved with every base pin as a constraint
    (except the spec's ``may_move``): it adds packages, it does not move the base's.
    """
    spec = lock_spec(output)
    base = base_lock(output, base)
    # Build backend and installer are locked too: set-up installs the project without build isolation.
    extra_inputs = [*tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"], "pip"]
    # A fixed, relative path: uv writes it into the lock's "via" comments, a temporary one churns them.
    constraint_name = "build/lock-constraints.txt"
    constraint = ROOT / constraint_name
    constraint.parent.mkdir(exist_ok=True)
    try:
        # torch is resolved at the pinned CPU build (its metadata lists no CUDA packages), not emitted.
        pins = [torch]
        if base is not None:
            pins += [f"{n}=={v}" for n, v in sorted(read_lock(base).items()) if n not in spec.may_move]
        constraint.write_text("\n".join(pins) + "\n")
        cmd = [
            sys.executable, "-m", "uv", "pip", "compile", str(PYPROJECT), "-",
            *[arg for extra in spec.extras for arg in ("--extra", extra)],
            "--constraint", constraint_name,
            "--generate-hashes",
            "--python-version", LOCKED_PYTHON,
            "--python-platform", "x86_64-unknown-linux-gnu",
            "--custom-compile-command", "make lock",
            "--output-file", str(output),
            *[arg for name in (*NOT_LOCKED, *spec.not_locked) for arg in ("--no-emit-package", name)],
            *[arg for link in pip_find_links() for arg in ("--find-links", link)],
            *(["--upgrade"] if upgrade else []),
        ]  # fmt: skip
        subprocess.run(cmd, input="\n".join(extra_inputs) + "\n", text=True, check=True, cwd=ROOT)
    finally:
        constraint.unlink(missing_ok=True)
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
    comp.add_argument("--base", type=Path, default=None, help="the base lock (default: the spec's)")
    pyp = sub.add_parser("check-pyproject", help="every declared dependency is locked within its range")
    pyp.add_argument("--lock", type=Path, default=LOCK)
    pyp.add_argument("--base", type=Path, default=None, help="the base lock (default: the spec's)")
    lay = sub.add_parser("layer", help="the pins a venv layered over the base lock's venv adds")
    lay.add_argument("--lock", type=Path, required=True)
    lay.add_argument("--base", type=Path, default=None)
    lay.add_argument("-o", "--output", type=Path, required=True)
    inst = sub.add_parser("check-installed", help="the running environment equals the lock")
    inst.add_argument("--lock", type=Path, default=LOCK)
    dif = sub.add_parser("diff", help="packages that moved between two locks")
    dif.add_argument("old", type=Path)
    dif.add_argument("new", type=Path)
    chk = sub.add_parser("pip-check", help="`pip check`, except packages the lock leaves out")
    chk.add_argument("--lock", type=Path, default=LOCK)
    link = sub.add_parser("link-base", help="let a layer venv see a base venv's packages")
    link.add_argument("layer", type=Path)
    link.add_argument("base", type=Path)
    args = parser.parse_args(argv)

    if args.command == "compile":
        compile_lock(args.output.resolve(), args.torch, args.upgrade, args.base)
        return 0
    if args.command == "layer":
        base = base_lock(args.lock, args.base)
        if base is None:
            raise SystemExit(f"{args.lock.name} has no base lock to layer over")
        args.output.write_text(layer_requirements(args.lock, base))
        return 0
    if args.command == "pip-check":
        result = subprocess.run(
            [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
        )
        left_out = tuple(lock_spec(args.lock).not_locked)
        problems = pip_check_problems(result.stdout + result.stderr, left_out)
        if problems or (result.returncode != 0 and not left_out):
            print("error: pip check:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
            return 1
        return 0
    if args.command == "link-base":
        link_base(args.layer, args.base)
        return 0
    if args.command == "diff":
        lines = diff(read_lock(args.old), read_lock(args.new))
        print("\n".join(lines) if lines else "  (no package moved)")
        return 0
    if args.command == "check-pyproject":
        spec, lock = lock_spec(args.lock), read_lock(args.lock)
        problems = pyproject_problems(lock, extras=spec.extras) + digest_problems(args.lock)
        base = base_lock(args.lock, args.base)
        if base is not None:
            problems += base_problems(lock, read_lock(base), base.name, spec)
        what = "pyproject.toml" + (f" and {base.name}" if base is not None else "")
        hint = f"{args.lock.name} no longer matches {what}; run `make lock` and commit the locks"
    else:
        problems = installed_problems(read_lock(args.lock))
        hint = f"this environment differs from {args.lock.name}; run `make setup` (or `make clean setup`)"
    if problems:
        print(f"error: {hint}:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
