"""`moe-llava model ...`: inspect model recipes without downloading anything."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect model recipes")
    commands = parser.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    info = commands.add_parser(
        "info", help="parameter counts (total / activated per token) of a recipe, dense and upcycled"
    )
    info.add_argument("--recipe", default="tiny", help="name of a conf/model/*.yaml recipe (default: tiny)")
    info.add_argument("--num-experts", type=int, default=4)
    info.add_argument("--top-k", type=int, default=2)
    info.add_argument("--layers", default="sparse", help="sparse | first_half | second_half | dense | 0,2,5")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from hydra.utils import instantiate

    from moe_llava.model import count_parameters
    from moe_llava.model.recipes import load_recipe

    layers = [int(i) for i in args.layers.split(",")] if args.layers[0].isdigit() else args.layers
    recipe = load_recipe(args.recipe)
    model = instantiate(recipe, pretrained=False, device="meta")  # structure only: no weights, no downloads
    dense = count_parameters(model)
    moe_layers = model.upcycle(num_experts=args.num_experts, top_k=args.top_k, layers=layers)
    moe = count_parameters(model)
    result = {"recipe": args.recipe, "moe_layers": moe_layers, "dense": dense.as_dict(), "moe": moe.as_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"recipe {args.recipe}: {args.num_experts} experts, top-{args.top_k}, MoE layers {moe_layers}")
    print(f"{'part':<16}{'dense':>14}{'MoE total':>14}{'MoE activated':>16}")
    for part in ("vision_tower", "projector", "language_model"):
        print(
            f"{part:<16}{_fmt(dense.parts[part].total):>14}{_fmt(moe.parts[part].total):>14}"
            f"{_fmt(moe.parts[part].activated):>16}"
        )
    print(f"{'all':<16}{_fmt(dense.total):>14}{_fmt(moe.total):>14}{_fmt(moe.activated):>16}")
    return 0


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
