"""Run lmms-eval on a MoE-LLaVA model: the subprocess behind ``moe-llava eval benchmark``.

    python -m moe_llava.evaluation.lmms_runner --model-args pretrained=DIR --tasks shapesworld_pope \
        --include-path src/moe_llava/evaluation/lmms_tasks/shapesworld --output-dir OUT [--limit N]

It runs in the venv that has lmms-eval (``.venv-lmms``) and does what ``lmms-eval --model moe_llava
... --log_samples --output_path OUT`` does (``simple_evaluate``, lmms-eval's ``EvaluationTracker``
writes ``<model>/<date>_results.json`` and ``<date>_samples_<task>.jsonl``), with two differences:
lmms-eval's ~340 built-in task folders are indexed only when a requested task is not in the
include paths (that indexing takes longer than a small evaluation), and any failure exits non-zero
(lmms-eval's CLI logs a failed evaluation and exits 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def task_manager(tasks: list[str], include_paths: list[str]):
    """A TaskManager over ``include_paths``; with lmms-eval's own tasks only when one is requested."""
    from lmms_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    return TaskManager(include_path=include_paths or None, include_defaults=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-args", required=True, help="pretrained=DIR_OR_URI[,dtype=...,...]")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task or group names")
    parser.add_argument("--include-path", action="append", default=[], help="a task folder (repeatable)")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--verbosity", default="WARNING")
    args = parser.parse_args(argv)

    import json

    from lmms_eval import evaluator
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str, handle_non_serializable

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = task_manager(tasks, args.include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        print(f"error: lmms-eval knows no task {', '.join(missing)}", file=sys.stderr)
        return 2
    tracker = EvaluationTracker(output_path=str(args.output_dir))
    datetime_str = get_datetime_str()
    results = evaluator.simple_evaluate(
        model="moe_llava",
        model_args=args.model_args,
        tasks=tasks,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        log_samples=True,
        evaluation_tracker=tracker,
        task_manager=manager,
        verbosity=args.verbosity,
        datetime_str=datetime_str,
    )
    if results is None:
        print("error: lmms-eval returned no results", file=sys.stderr)
        return 1
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(json.dumps(results["results"], default=handle_non_serializable, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
