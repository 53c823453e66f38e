"""`moe-llava registry ...`: register a model (with the promotion gate), promote, roll back, show.

Settings come from the composed Hydra defaults (``conf/registry/default.yaml``, ``conf/logger/``);
flags override them; ``--override KEY=VALUE`` passes any Hydra override (e.g. ``experiment=tiny_cpu``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("registry settings (default: conf/registry/default.yaml)")
    group.add_argument("--model-name", help="registered model name (default: registry.model_name)")
    group.add_argument("--gate-metric", help="metric the gate compares (default: registry.gate.metric)")
    group.add_argument(
        "--gate-direction", choices=["maximize", "minimize"], help="default: registry.gate.direction"
    )
    group.add_argument("--min-margin", type=float, help="default: registry.gate.min_margin")
    group.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: as training)")
    group.add_argument(
        "--override",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override of the composed config (repeatable), e.g. -o experiment=tiny_cpu",
    )

    parser = subparsers.add_parser(
        "registry", help="MLflow model registry: register, promote, rollback, show"
    )
    commands = parser.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    reg = commands.add_parser(
        "register",
        parents=[common],
        help="log a stage export as the pyfunc model, register a new version, apply the promotion gate",
    )
    reg.add_argument("--model-dir", required=True, help="a stage export (or a stage folder holding export/)")
    reg.add_argument(
        "--metrics",
        required=True,
        action="append",
        help="the evaluation's metrics.json (flat keys); repeat to merge several, e.g. a benchmark's "
        "lmms/... metrics.json (later files win on a shared name)",
    )
    reg.add_argument("--config", help="the pipeline's config YAML (tagged on the version)")
    reg.add_argument("--run-id", help="log into this MLflow run (e.g. the stage's) instead of a new one")
    reg.add_argument("--no-gate", action="store_true", help="register as challenger, never auto-promote")
    reg.add_argument(
        "--json-out",
        type=Path,
        metavar="FILE",
        help="also write the result (version, aliases, the gate's decision) to FILE as one JSON "
        "document, for scripts (the Prefect flow reads it); the console output stays as it is",
    )
    reg.set_defaults(func=_register)

    promote = commands.add_parser("promote", parents=[common], help="make VERSION the champion by hand")
    promote.add_argument("version")
    promote.add_argument("--reason", help="recorded in the version's alias history")
    promote.set_defaults(func=_promote)

    rollback = commands.add_parser(
        "rollback", parents=[common], help="give champion back to the previous champion"
    )
    rollback.add_argument("--reason", help="recorded in the versions' alias history")
    rollback.set_defaults(func=_rollback)

    show = commands.add_parser("show", parents=[common], help="versions, aliases and gate metric values")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=_show)


def settings_from_args(args: argparse.Namespace):
    from moe_llava.registry.settings import load_settings

    return load_settings(
        args.override,
        model_name=args.model_name,
        gate_metric=args.gate_metric,
        gate_direction=args.gate_direction,
        min_margin=args.min_margin,
        tracking_uri=args.tracking_uri,
    )


def _registry(args: argparse.Namespace):
    from moe_llava.registry.registry import ModelRegistry
    from moe_llava.tracking import require_server

    settings = settings_from_args(args)
    require_server(settings.resolved_tracking_uri(), settings.logger.get("connect_timeout_s"))
    return ModelRegistry(settings.model_name, settings.gate, tracking_uri=settings.resolved_tracking_uri())


def _register(args: argparse.Namespace) -> int:
    from moe_llava.registry.gate import load_metrics
    from moe_llava.registry.workflow import register_export

    metrics = {}
    for path in args.metrics:
        metrics.update(load_metrics(path))
    result = register_export(
        args.model_dir,
        metrics,
        settings=settings_from_args(args),
        config=args.config,
        run_id=args.run_id,
        apply_gate=not args.no_gate,
    )
    if args.json_out:
        _write_json(args.json_out, result.as_dict())
    _print_json(result.as_dict())
    return 0


def _promote(args: argparse.Namespace) -> int:
    _print_json(_registry(args).promote(args.version, args.reason))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    _print_json(_registry(args).rollback(args.reason))
    return 0


def _show(args: argparse.Namespace) -> int:
    info = _registry(args).describe()
    if args.json:
        _print_json(info)
        return 0
    if not info["exists"]:
        print(f"registered model {info['model_name']!r}: no versions yet")
        return 0
    gate = info["gate"]
    print(
        f"registered model {info['model_name']!r}: champion "
        f"{_v(info['aliases'].get('champion'))}, challenger {_v(info['aliases'].get('challenger'))}; "
        f"gate {gate['metric']} ({gate['direction']}, min_margin {gate['min_margin']:g})"
    )
    print(f"champion history (oldest first): {', '.join(_v(v) for v in info['champion_history']) or '-'}")
    print(f"{'version':>8}  {'aliases':<22}{gate['metric']:>16}  {'gate':<11}{'created':<27}git")
    for row in info["versions"]:
        value = row["gate_value"]
        value_text = f"{float(value):.4f}" if isinstance(value, (int, float)) else "-"
        print(
            f"{row['version']:>8}  {','.join(row['aliases']) or '-':<22}{value_text:>16}  "
            f"{row['gate_decision'] or '-':<11}{row['created']:<27}{(row['git_commit'] or '-')[:10]}"
        )
    return 0


def _v(version: str | None) -> str:
    return f"v{version}" if version else "-"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def _print_json(value: Any) -> None:
    print(_json(value))


def _write_json(path: Path, value: Any) -> None:
    from moe_llava.atomic import write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: tmp.write_text(_json(value) + "\n"), "registration JSON")
