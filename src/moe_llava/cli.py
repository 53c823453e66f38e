"""`moe-llava` console script: one entry point, one sub-command group per concern.

Each group lives next to the code it drives (``moe_llava.<concern>.cli``) and exposes
``register(subparsers)``; this file only wires them together, importing lazily so that
``moe-llava --help`` stays fast and a broken optional group cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_llava.errors import user_errors

# group name -> module exposing `register(subparsers) -> None`
COMMAND_GROUPS: dict[str, str] = {
    "model": "moe_llava.model.cli",
    "train": "moe_llava.training.cli",
    "data": "moe_llava.data.cli",
    "demo": "moe_llava.demo",
    "registry": "moe_llava.registry.cli",
    "chat": "moe_llava.chat",
    "eval": "moe_llava.evaluation.cli",
    "pipeline": "moe_llava.pipeline.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-llava", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_GROUPS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors("moe-llava", exit=False) as failed:  # a user error: one line; a bug: its traceback
        return int(args.func(args) or 0)
    return failed.code


if __name__ == "__main__":
    sys.exit(main())
