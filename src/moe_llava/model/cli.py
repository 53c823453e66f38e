"""`moe-llava model ...`: inspect model recipes without downloading anything; convert the released
MoE-LLaVA checkpoints to our exports and back (``moe-llava model convert``); merge LoRA adapters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_llava.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "model", help="inspect model recipes, convert released checkpoints, merge LoRA adapters"
    )
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
    convert = commands.add_parser(
        "convert",
        help="a released MoE-LLaVA checkpoint (LanguageBind/MoE-LLaVA-*) -> one of our exports, or back",
        description="SRC -> DST. Default (--to ours): SRC is a released MoE-LLaVA checkpoint folder "
        "(model_type moe_llava_phi / moe_llava_stablelm / moe_llava_qwen) and DST becomes an export "
        "that chat, evaluation, the registry and init_from take. --to reference: SRC is one of our MoE "
        "exports and DST gets the released layout. Streams tensor by tensor; DST is written atomically.",
    )
    convert.add_argument("src", help="source folder")
    convert.add_argument("dst", help="destination folder (replaced whole)")
    convert.add_argument(
        "--to", choices=("ours", "reference"), default="ours", help="direction (default: ours)"
    )
    convert.add_argument(
        "--dtype", default=None, help="bf16 | fp16 | fp32 (default: as stored; routers stay fp32)"
    )
    convert.add_argument(
        "--vision-tower", default=None, metavar="DIR",
        help="the vision tower's own folder (its hub original): weights, config and image processor from there",
    )  # fmt: skip
    convert.add_argument(
        "--vision-config", default=None, metavar="FILE",
        help="config.json of the vision tower when mm_image_tower is not a known hub id",
    )  # fmt: skip
    convert.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.set_defaults(func=_convert)
    merge = commands.add_parser(
        "merge-lora",
        help="merge a LoRA stage's adapter export (lora.export=adapter) into its base: a plain export",
    )
    merge.add_argument("base", help="the export the LoRA stage started from, e.g. <run_dir>/stage2/export")
    merge.add_argument("adapter", help="the LoRA stage's adapter export, e.g. <run_dir>/stage3/export")
    merge.add_argument("dst", help="folder of the merged export (written whole, or not at all)")
    merge.set_defaults(func=_merge_lora)


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


def _convert(args: argparse.Namespace) -> int:
    if args.to == "reference":
        from moe_llava.model.convert.reference import convert_to_reference

        if args.vision_tower or args.vision_config:
            raise UserError("--vision-tower / --vision-config apply to --to ours only")
        report = convert_to_reference(
            args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size
        )
    else:
        from moe_llava.model.convert.released import convert_released

        report = convert_released(
            args.src,
            args.dst,
            dtype=args.dtype,
            vision_tower=args.vision_tower,
            vision_config=args.vision_config,
            max_shard_size=args.max_shard_size,
        )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    dtypes = ", ".join(f"{n} {d}" for d, n in sorted(report.dtypes.items()))
    print(
        f"converted {report.source} ({report.backbone}, {report.source_format}) -> {report.target}: "
        f"{report.tensors} tensors ({dtypes}), {report.bytes_written / 1e9:.2f} GB in {report.seconds:.1f} s"
    )
    for note in report.notes:
        print(f"  {note}")
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from transformers import AutoImageProcessor

    from moe_llava.data.tokenizer import load_tokenizer
    from moe_llava.model.lora import merge_adapter
    from moe_llava.training.run import export_stage

    model = merge_adapter(args.base, args.adapter)
    tokenizer = load_tokenizer(args.adapter)  # the LoRA stage saved its tokenizer and processor beside them
    image_processor = AutoImageProcessor.from_pretrained(args.adapter, trust_remote_code=False)
    export_stage(model, tokenizer, image_processor, Path(args.dst))
    layout = f"MoE layers {model.config.moe['layers']}" if model.is_moe else "dense"
    print(f"merged {args.adapter} into {args.base}: {args.dst} ({layout})")
    return 0


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
