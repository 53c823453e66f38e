"""`moe-llava train [hydra overrides...]`: the same entry point as `python -m moe_llava.train`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage: moe-llava train stage=stage2 experiment=tiny_cpu [overrides]",
        add_help=False,  # --help and all arguments go to Hydra
    )
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from moe_llava import train

    # Hydra parses sys.argv; Lightning's DDP launcher re-executes sys.argv for the other ranks,
    # so this must look like the command the user typed.
    sys.argv = [sys.argv[0], *args.overrides]
    train.main()
    return 0
