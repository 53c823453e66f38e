"""``moe-llava data ...``: validate, prepare, generate ShapesWorld, train a tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_llava.errors import UserError

DEFAULT_SHAPESWORLD_DIR = "data/shapesworld"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="datasets: validate, prepare, generate ShapesWorld, tokenizer"
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    validate = commands.add_parser(
        "validate", help="check every record of a LLaVA manifest; exit 1 if any is invalid"
    )
    _add_check_args(validate)
    validate.add_argument(
        "--max-report", type=int, default=200, help="invalid records listed (default 200; counts cover all)"
    )
    validate.add_argument("--report-json", type=Path, help="also write the summary as JSON here")
    validate.set_defaults(func=_cmd_validate)

    prepare = commands.add_parser(
        "prepare",
        help="write a cleaned manifest + quarantine + counts; fail above the rejected-fraction threshold",
    )
    _add_check_args(prepare)
    prepare.add_argument(
        "--out-dir", type=Path, required=True, help="output folder (manifest, quarantine.jsonl, counts.json)"
    )
    prepare.add_argument(
        "--max-rejected-fraction", type=float, default=0.05, help="fail above this fraction (default 0.05)"
    )
    prepare.set_defaults(func=_cmd_prepare)

    generate = commands.add_parser(
        "generate", help="generate the ShapesWorld corpus (images, manifests, POPE, tokenizer)"
    )
    generate.add_argument(
        "--out", type=Path, default=Path(DEFAULT_SHAPESWORLD_DIR), help=f"default {DEFAULT_SHAPESWORLD_DIR}"
    )
    generate.add_argument(
        "--config",
        type=Path,
        help="YAML with the generator settings (a data config's `generator:` node, or the mapping itself)",
    )
    generate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting",
    )
    generate.add_argument("--no-progress", action="store_true")
    generate.set_defaults(func=_cmd_generate)

    tok = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on manifests' text")
    tok.add_argument("manifests", nargs="+", type=Path)
    tok.add_argument("--out", type=Path, required=True)
    tok.add_argument("--vocab-size", type=int, default=1024)
    tok.set_defaults(func=_cmd_train_tokenizer)


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="LLaVA JSON or JSONL manifest")
    p.add_argument("--image-folder", type=Path, help="folder the records' image paths are relative to")
    p.add_argument("--tokenizer", help="tokenizer dir or name (enables the length and label-mask checks)")
    p.add_argument(
        "--template",
        default=None,
        help="conversation template (plain, phi, qwen, stablelm, vicuna_v1); default phi",
    )
    p.add_argument(
        "--max-length", type=int, default=None, help="token budget per sample, image tokens included"
    )
    p.add_argument(
        "--num-image-tokens", type=int, default=1, help="tokens per image (the model's; default 1)"
    )
    p.add_argument(
        "--max-image-pixels", type=int, default=None, help="decompression-bomb guard (default 40M)"
    )
    p.add_argument("--image-check", choices=("full", "header", "exists", "none"), default="full")
    p.add_argument(
        "--overlength",
        choices=("reject", "truncate", "truncate_turns"),
        default="reject",
        help="over max_length: quarantine (default), cut the token tail, or keep the whole exchanges that fit",
    )
    p.add_argument(
        "--leading-gpt",
        choices=("reject", "drop"),
        default="reject",
        help="a conversation starting with an assistant turn: quarantine (default) or drop that turn",
    )
    p.add_argument("--workers", type=int, default=1, help="threads for image checks")
    p.add_argument("--no-progress", action="store_true")


def _validator(args: argparse.Namespace):
    from moe_llava.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from moe_llava.data.validation import Validator

    tokenizer = None
    if args.tokenizer:
        from moe_llava.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    return Validator(
        image_folder=args.image_folder,
        tokenizer=tokenizer,
        template=(args.template or "phi") if tokenizer is not None else None,
        max_length=args.max_length,
        num_image_tokens=args.num_image_tokens,
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        image_check=args.image_check,
        overlength=args.overlength,
        leading_gpt=args.leading_gpt,
    )


def _cmd_validate(args: argparse.Namespace) -> int:
    from moe_llava.data.validation import validate_manifest

    report = validate_manifest(
        args.manifest, _validator(args), workers=args.workers, progress=not args.no_progress
    )
    print(report.format(max_records=args.max_report))
    if args.report_json:
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


def _cmd_prepare(args: argparse.Namespace) -> int:
    from moe_llava.data.prepare import prepare_manifest

    result = prepare_manifest(
        args.manifest,
        args.out_dir,
        _validator(args),
        max_rejected_fraction=args.max_rejected_fraction,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(result.summary())
    return 0


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _cmd_generate(args: argparse.Namespace) -> int:
    from moe_llava.data.shapesworld import ShapesWorldConfig, generate_shapesworld

    values: dict = {}
    if args.config:
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(args.config), resolve=False)
        if isinstance(loaded, dict) and isinstance(loaded.get("generator"), dict):
            loaded = loaded["generator"]
        if not isinstance(loaded, dict):
            raise UserError(f"{args.config}: expected a mapping of ShapesWorld settings")
        values.update(loaded)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value)
    config = ShapesWorldConfig.from_any(values)
    summary = generate_shapesworld(args.out, config, progress=not args.no_progress)
    print(f"ShapesWorld written to {args.out}: images {summary['images']}", file=sys.stderr)
    print(json.dumps(summary["records"], indent=2))
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from moe_llava.constants import IMAGE_TOKEN
    from moe_llava.data.manifest import iter_manifest
    from moe_llava.data.tokenizer import train_bpe_tokenizer

    def texts():
        for manifest in args.manifests:
            for record in iter_manifest(manifest):
                for turn in record.get("conversations", []):
                    yield str(turn.get("value", "")).replace(IMAGE_TOKEN, "")

    tokenizer = train_bpe_tokenizer(texts(), args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.out}")
    return 0
