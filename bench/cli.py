"""Command line: ``python -m bench [SUITE ...] [--quick] [--out PATH] ...``.

:func:`main` is the whole command; :func:`register` adds the same command as a sub-command of
another ``argparse`` CLI (``moe-llava bench``), and :func:`run_suite` is the programmatic entry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench import registry

DEFAULT_OUT_DIR = Path("bench_results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all): {', '.join(registry.SUITES)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small, fast configuration (about a minute on 2 cores)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result path (one suite only; default bench_results/<suite>.json)",
    )
    parser.add_argument(
        "--device", default=None, help="auto (default: CUDA when available), cpu, cuda, cuda:1 ..."
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before them")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts per case")
    parser.add_argument("--dtypes", nargs="+", default=None, help="float32 and/or bfloat16")
    parser.add_argument("--activations", nargs="+", default=None, help="swiglu and/or gelu experts")
    parser.add_argument("--modes", nargs="+", default=None, help="fwd and/or fwd_bwd")
    parser.add_argument("--d-model", type=int, default=None, help="model width (default 512)")
    parser.add_argument("--ffn", type=int, default=None, help="FFN width (default 2048)")
    parser.add_argument(
        "--skip", nargs="+", default=None, help="variant names not to run (e.g. deepspeed_einsum)"
    )
    parser.add_argument(
        "--keep-loaded-rounds",
        action="store_true",
        help="no contention control: keep rounds during which other processes competed for the CPUs",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory pass")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, table only")
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


_DISABLED = object()  # an override that sets a field to None (plain None means "not given")


def run_suite(name: str, quick: bool = False, out: Path | None = None, log=print, **overrides) -> dict:
    """Run one suite, write its JSON to ``out`` (default ``bench_results/<name>.json``), return the result."""
    suite = registry.load(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = suite.config_from_options(
        quick=quick, **{k: (None if v is _DISABLED else v) for k, v in overrides.items()}
    )
    result = suite.run(config, log=log)
    result["quick"] = quick
    out = Path(out) if out is not None else DEFAULT_OUT_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=2, default=_json_default) + "\n")
    result["json_path"] = str(out)
    return result


def _run_from_args(args: argparse.Namespace) -> int:
    names = args.suites or list(registry.SUITES)
    for name in names:
        registry.load(name)  # unknown names fail before anything runs
    if args.out is not None and len(names) > 1:
        raise ValueError("--out names one file: give exactly one suite with it")
    log = (lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    overrides = {
        "device": args.device,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tokens": args.tokens,
        "dtypes": args.dtypes,
        "activations": args.activations,
        "modes": args.modes,
        "skip": args.skip,
        "d_model": args.d_model,
        "ffn": args.ffn,
        "memory": False if args.no_memory else None,
        "max_waiting_cores": _DISABLED if args.keep_loaded_rounds else None,
    }
    failed = False
    for name in names:
        result = run_suite(name, quick=args.quick, out=args.out, log=log, **overrides)
        suite = registry.load(name)
        print(suite.format_table(result))
        print(f"\nresults: {result['json_path']}  ({result['wall_s']:.0f} s)")
        failed |= not result.get("all_checks_passed", True)
    if failed:
        print("bench: a correctness check failed: the timings compare outputs that differ", file=sys.stderr)
    return 1 if failed else 0


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
