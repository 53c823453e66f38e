"""``moe-llava pipeline params [--check] [overrides...]``: write (or check) ``params/<stage>.yaml`` and
``params/inputs.yaml``; a configuration dvc.yaml cannot run is refused with the reason (exit 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="the DVC/Prefect pipeline: its parameter files")
    commands = parser.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE_COMMAND")
    params = commands.add_parser(
        "params",
        help="compose conf/ per stage into params/<stage>.yaml (dvc.yaml's parameters) and params/inputs.yaml",
    )
    params.add_argument(
        "overrides", nargs="*", help="Hydra overrides (default: experiment=tiny_cpu, the embedded default)"
    )
    params.add_argument(
        "--out", type=Path, help="folder (default: params/ in the current directory, the project root)"
    )
    params.add_argument("--check", action="store_true", help="exit 1 if the files differ; write nothing")
    params.set_defaults(func=_params)


def _params(args: argparse.Namespace) -> int:
    from moe_llava.pipeline.params import DEFAULT_OVERRIDES, PARAMS_DIR, stale_params, write_params

    overrides = args.overrides or list(DEFAULT_OVERRIDES)
    out_dir = args.out or PARAMS_DIR
    if args.check:
        stale = stale_params(overrides, out_dir)
        for path in stale:
            print(f"{path}: differs from conf/ composed with {overrides}", file=sys.stderr)
        if stale:
            print(f"regenerate: moe-llava pipeline params {' '.join(overrides)}", file=sys.stderr)
        return 1 if stale else 0
    changed = write_params(overrides, out_dir)
    print(f"{len(changed)} of 4 parameter files changed in {out_dir}: {[p.name for p in changed]}")
    return 0
