"""Command line: ``python -m bench [SUITE ...] [--quick] [--out PATH] ...``.

:func:`main` is the whole command; :func:`register` adds the same command as a sub-command of
another ``argparse`` CLI (``moe-llava bench``), and :func:`run_suite` is the programmatic entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path

from bench import registry

DEFAULT_OUT_DIR = Path("bench_results")


# Options that set a field of a suite's config: (flags, config field, argparse keywords). A suite
# gets the options its config has; an option that no selected suite has is a usage error.
CONFIG_OPTIONS: tuple[tuple[tuple[str, ...], str, dict], ...] = (
    (
        ("--device",),
        "device",
        {"help": "auto (default: CUDA when available), cpu, cuda, cuda:1 ... (layer, training, generation)"},
    ),
    (
        ("--repeats",),
        "repeats",
        {"type": int, "help": "timed interleaved rounds per case (e2e: pipeline runs)"},
    ),
    (("--warmup",), "warmup", {"type": int, "help": "untimed rounds before them"}),
    (("--tokens",), "tokens", {"type": int, "nargs": "+", "help": "layer: token counts per case"}),
    (("--dtypes",), "dtypes", {"nargs": "+", "help": "layer, training: float32 and/or bfloat16"}),
    (("--activations",), "activations", {"nargs": "+", "help": "layer: swiglu and/or gelu experts"}),
    (("--modes",), "modes", {"nargs": "+", "help": "layer: fwd and/or fwd_bwd"}),
    (
        ("--d-model",),
        "d_model",
        {"type": int, "help": "model width (layer, training, generation; default 512)"},
    ),
    (("--ffn",), "ffn", {"type": int, "help": "FFN width (layer, training, generation; default 2048)"}),
    (("--layers",), "layers", {"type": int, "help": "training, generation: decoder layers (default 4)"}),
    (("--heads",), "heads", {"type": int, "help": "training, generation: attention heads (default 8)"}),
    (
        ("--batch-size",),
        "batch_size",
        {"type": int, "help": "training: sequences per step; data: loader batch (default: the preset's)"},
    ),
    (
        ("--seq-len",),
        "seq_len",
        {"type": int, "help": "training: tokens per sequence, image tokens included"},
    ),
    (
        ("--batch-sizes",),
        "batch_sizes",
        {"type": int, "nargs": "+", "help": "generation: batch sizes (default 1 8)"},
    ),
    (
        ("--prompt-len",),
        "prompt_len",
        {"type": int, "help": "generation: text tokens of the prompt after the image"},
    ),
    (("--new-tokens",), "new_tokens", {"type": int, "help": "generation: new tokens per sequence"}),
    (
        ("--data-root",),
        "data_root",
        {"help": "data, e2e: a ShapesWorld folder (default: data/shapesworld, else generated)"},
    ),
    (
        ("--num-workers",),
        "num_workers",
        {"type": int, "help": "data: DataLoader workers (default: the trainer config's)"},
    ),
    (
        ("--max-steps",),
        "max_steps",
        {"type": int, "help": "e2e: optimizer steps per stage (default: the preset's; quick: 2)"},
    ),
    (("--stages",), "stages", {"nargs": "+", "help": "e2e: stages to run (default backbones stage1 stage2 stage3)"}),
    (
        ("--override",),
        "hydra_overrides",
        {
            "nargs": "+",
            "metavar": "KEY=VALUE",
            "help": "data, e2e: extra Hydra overrides of the tiny_cpu config",
        },
    ),
    (("--skip",), "skip", {"nargs": "+", "help": "layer: variant names not to run (e.g. deepspeed_einsum)"}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run, in this order (default: all): {', '.join(registry.SUITES)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small, fast configurations (all suites: about two minutes on 2 cores)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result path (one suite only; default bench_results/<suite>.json)",
    )
    for flags, dest, kwargs in CONFIG_OPTIONS:
        parser.add_argument(*flags, dest=dest, default=None, **kwargs)
    parser.add_argument(
        "--keep-loaded-rounds",
        action="store_true",
        help="no contention control: keep rounds during which other processes competed for the CPUs",
    )
    parser.add_argument("--no-memory", action="store_true", help="layer: skip the (untimed) peak-memory pass")
    parser.add_argument("--no-eval", action="store_true", help="e2e: do not run the evaluation after stage 3")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, tables only")
    parser.set_defaults(func=_run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def register(subparsers) -> None:
    """Add ``bench`` to another CLI's sub-commands (the ``moe-llava`` console script)."""
    parser = subparsers.add_parser("bench", help="run benchmarks, print a table, write JSON results")
    add_arguments(parser)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


DISABLED = _DISABLED = object()  # an override that sets a field to None (plain None means "not given")


def build_config(name: str, quick: bool = False, **overrides):
    """The suite's QUICK or FULL config with ``overrides`` (None: not given; :data:`DISABLED`: None)."""
    suite = registry.load(name)
    overrides = {k: (None if v is _DISABLED else v) for k, v in overrides.items() if v is not None}
    return suite.config_from_options(quick=quick, **overrides)


def run_suite(name: str, quick: bool = False, out: Path | None = None, log=print, **overrides) -> dict:
    """Run one suite, write its JSON to ``out`` (default ``bench_results/<name>.json``), return the result."""
    suite = registry.load(name)
    config = build_config(name, quick, **overrides)
    result = suite.run(config, log=log)
    result["quick"] = quick
    out = Path(out) if out is not None else DEFAULT_OUT_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=2, default=_json_default) + "\n")
    result["json_path"] = str(out)
    return result


def _overrides_from_args(args: argparse.Namespace) -> dict:
    """Config-field overrides the user gave (None = not given; _DISABLED = set the field to None)."""
    overrides = {dest: getattr(args, dest) for _, dest, _ in CONFIG_OPTIONS}
    overrides["memory"] = False if args.no_memory else None
    overrides["evaluate"] = False if args.no_eval else None
    overrides["max_waiting_cores"] = _DISABLED if args.keep_loaded_rounds else None
    return {k: v for k, v in overrides.items() if v is not None}


def _flag_of(dest: str) -> str:
    for flags, name, _ in CONFIG_OPTIONS:
        if name == dest:
            return flags[0]
    return {
        "memory": "--no-memory",
        "evaluate": "--no-eval",
        "max_waiting_cores": "--keep-loaded-rounds",
    }.get(dest, dest)


def split_overrides(names: list[str], overrides: dict, quick: bool) -> dict[str, dict]:
    """Per suite, the overrides its config has. An override that no selected suite has is an error."""
    per_suite, used = {}, set()
    for name in names:
        suite = registry.load(name)
        fields = {f.name for f in dataclasses.fields(suite.config_from_options(quick=quick))}
        per_suite[name] = {k: v for k, v in overrides.items() if k in fields}
        used |= set(per_suite[name])
    unused = sorted(set(overrides) - used)
    if unused:
        flags = ", ".join(_flag_of(k) for k in unused)
        raise ValueError(f"{flags} does not apply to the selected suite(s) {', '.join(names)}")
    return per_suite


def _run_from_args(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.suites)) or list(registry.SUITES)
    for name in names:
        registry.load(name)  # unknown names fail before anything runs
    if args.out is not None and len(names) > 1:
        raise ValueError("--out names one file: give exactly one suite with it")
    per_suite = split_overrides(names, _overrides_from_args(args), args.quick)
    for name in names:  # invalid option values fail before anything runs
        build_config(name, args.quick, **per_suite[name])
    log = (lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    failed_checks, crashed, results = [], [], {}
    for name in names:
        suite = registry.load(name)
        try:
            result = run_suite(name, quick=args.quick, out=args.out, log=log, **per_suite[name])
        except Exception:  # one broken suite must not hide the others' results
            crashed.append(name)
            print(f"bench: suite {name!r} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        results[name] = result
        print(suite.format_table(result))
        print(f"\nresults: {result['json_path']}  ({result['wall_s']:.0f} s)\n", flush=True)
        if not result.get("all_checks_passed", True):
            failed_checks.append(name)
    if len(names) > 1:
        print(summary(results, crashed))
    if failed_checks:
        print(
            f"bench: a correctness check failed in {', '.join(failed_checks)}: the timings compare outputs that differ",
            file=sys.stderr,
        )
    return 1 if failed_checks or crashed else 0


def summary(results: dict[str, dict], crashed: list[str] = ()) -> str:
    """Every suite's target verdicts in one list (after a multi-suite run)."""
    lines = ["summary of targets (all suites):"]
    for name, result in results.items():
        verdicts = result.get("targets", [])
        checks = "checks ok" if result.get("all_checks_passed", True) else "CHECKS FAILED"
        lines.append(f"  {name} ({checks}, {result['wall_s']:.0f} s)")
        if not verdicts:
            lines.append("      no targets")
        for v in verdicts:
            if v.get("met") is None:
                lines.append(f"      ----  {v['target']} {v['case']}: {v.get('reason', 'not measured')}")
                continue
            word = "met " if v["met"] else "MISS"
            lines.append(
                f"      {word}  {v['target']} {v['case']}: {v['value']:.3f} {v['op']} {v['threshold']:.3f} "
                f"(margin {v['margin']:+.1%})"
            )
    for name in crashed:
        lines.append(f"  {name}: FAILED TO RUN (traceback above)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
