"""The paper's benchmark table through lmms-eval: ``moe-llava eval benchmark --model ... --tasks paper``.

lmms-eval lives in its own venv (``make setup-lmms`` -> ``.venv-lmms``), so this module never
imports it: it runs :mod:`moe_llava.evaluation.lmms_runner` in that venv's interpreter as a
subprocess, checks the results itself (every requested task must have numeric results: a failed
task fails the command whatever the exit status), logs every numeric metric to MLflow as
``lmms/<task>/<metric>`` with the results and per-sample files as artifacts, adds the metrics and
the run to a registered version's tags (so the promotion gate can compare them), and prints the
table beside the paper's numbers.

Task names: ``paper`` (the paper's benchmarks that lmms-eval scores locally), ``paper-all`` (plus
those that only write submission files or need a GPT judge), ``shapesworld`` (the embedded
default, offline), or any comma-separated lmms-eval task and group names.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_llava.errors import UserError
from moe_llava.evaluation.benchmarks import metric_name
from moe_llava.evaluation.lmms_scoring import SHAPESWORLD_IMAGES_ENV
from moe_llava.paths import REPO_ROOT

TASKS_DIR = Path(__file__).with_name("lmms_tasks")
SHAPESWORLD_TASKS = TASKS_DIR / "shapesworld"
PAPER_TASKS = TASKS_DIR / "paper"
LMMS_PYTHON_ENV = "MOE_LLAVA_LMMS_PYTHON"
DEFAULT_LMMS_VENV = REPO_ROOT / ".venv-lmms"
METRIC_PREFIX = "lmms"
RUNNER = "moe_llava.evaluation.lmms_runner"
SCORED, SUBMISSION, GPT_JUDGE = "scored locally", "submission only", "needs a GPT judge"


class BenchmarkError(RuntimeError):
    """lmms-eval could not run, or a task produced no result: the message says which and why."""


@dataclass(frozen=True)
class PaperBenchmark:
    """One column of the paper's table and the lmms-eval task that measures it."""

    column: str
    task: str
    metric: str | None  # the result key (without lmms-eval's ``,<filter>``); None: nothing to compare
    scale: float  # lmms-eval's value -> the paper's unit (fractions -> percent)
    kind: str  # SCORED, SUBMISSION or GPT_JUDGE
    note: str = ""


PAPER_BENCHMARKS = (
    PaperBenchmark("VQAv2", "vqav2_val", "exact_match", 100, SCORED, "val; the paper's test-dev: vqav2_test"),
    PaperBenchmark("GQA", "gqa", "exact_match", 100, SCORED, "testdev balanced"),
    PaperBenchmark(
        "VizWiz", "vizwiz_vqa_val", "exact_match", 100, SCORED, "val; the paper's test: vizwiz_vqa_test"
    ),
    PaperBenchmark("SQA-I", "scienceqa_img", "exact_match", 100, SCORED),
    PaperBenchmark("TextVQA", "textvqa_val", "exact_match", 100, SCORED),
    PaperBenchmark(
        "POPE F1", "moe_llava_pope", "f1", 100, SCORED, "mean F1 of 3 COCO splits, the paper's rule"
    ),
    PaperBenchmark("MME", "mme", "mme_perception_score", 1, SCORED, "perception score"),
    PaperBenchmark("MMB", "mmbench_en_dev", "gpt_eval_score", 1, GPT_JUDGE, "dev; GPT matches the answers"),
    PaperBenchmark("LLaVA-Bench", "llava_in_the_wild", "gpt_eval_llava_all", 1, GPT_JUDGE),
    PaperBenchmark("MM-Vet", "mmvet", "gpt_eval_score", 1, GPT_JUDGE),
    PaperBenchmark("VQAv2 test-dev", "vqav2_test", None, 1, SUBMISSION, "EvalAI submission file"),
    PaperBenchmark("VizWiz test", "vizwiz_vqa_test", None, 1, SUBMISSION, "EvalAI submission file"),
    PaperBenchmark("MMB test", "mmbench_en_test", None, 1, SUBMISSION, "submission file"),
)
# The paper's numbers (../shared/reference/moe-llava.md): VQAv2 is test-dev, MMB the paper's split.
PAPER_COLUMNS = ("VQAv2", "GQA", "SQA-I", "TextVQA", "POPE F1", "MME", "MMB")
PAPER_NUMBERS = {
    "LLaVA-1.5-7B": (78.5, 62.0, 66.8, 58.2, 85.9, 1510.7, 64.3),
    "LLaVA-1.5-13B": (80.0, 63.3, 71.6, 61.3, 85.9, 1531.3, 67.7),
    "MoE-LLaVA-1.8Bx4-Top2": (76.2, 61.5, 63.1, 48.0, 87.0, 1291.6, 59.7),
    "MoE-LLaVA-2.7Bx4-Top2": (77.6, 61.4, 68.5, 51.4, 86.3, 1423.0, 65.2),
}
# the released model a backbone matches (the language model's config model_type)
RELEASED_BY_MODEL_TYPE = {
    "qwen": "MoE-LLaVA-1.8Bx4-Top2",
    "qwen2": "MoE-LLaVA-1.8Bx4-Top2",
    "phi": "MoE-LLaVA-2.7Bx4-Top2",
}

SHAPESWORLD_TASK_NAMES = (
    "shapesworld_pope",
    "shapesworld_vqa_val",
    "shapesworld_vqa_test",
)
TASK_PRESETS = {
    "paper": tuple(b.task for b in PAPER_BENCHMARKS if b.kind == SCORED),
    "paper-all": tuple(b.task for b in PAPER_BENCHMARKS),
    "shapesworld": SHAPESWORLD_TASK_NAMES,
}


# ---------------------------------------------------------------------- tasks and task folders
def expand_tasks(spec: str) -> list[str]:
    """``paper`` / ``paper-all`` / ``shapesworld`` or comma-separated names -> task names, in order."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            names += TASK_PRESETS.get(part, (part,))
    if not names:
        raise UserError(f"--tasks: no task named in {spec!r}")
    return list(dict.fromkeys(names))


def render_shapesworld_tasks(data_root: str | Path, dest: Path) -> Path:
    """The shipped ShapesWorld task folder with its question files read from ``data_root``.

    The shipped YAMLs name ``data/shapesworld/...`` (relative to the repository root); the copies
    in ``dest`` name ``data_root``'s files absolutely and include the shipped templates by path.
    """
    root = Path(data_root).resolve()
    if not (root / "pope_random.jsonl").is_file():
        raise UserError(f"--data-root {data_root}: no ShapesWorld question files (pope_random.jsonl) there")
    dest.mkdir(parents=True, exist_ok=True)
    for source in SHAPESWORLD_TASKS.glob("*.yaml"):
        text = source.read_text()
        text = re.sub(
            r"^include: (\S+)$", lambda m: f"include: {SHAPESWORLD_TASKS / m.group(1)}", text, flags=re.M
        )
        text = text.replace("data/shapesworld/", f"{root}/")
        (dest / source.name).write_text(text)
    return dest


# ---------------------------------------------------------------------- running lmms-eval
def lmms_python(explicit: str | None = None) -> str:
    """The interpreter that has lmms-eval: ``explicit``, ``$MOE_LLAVA_LMMS_PYTHON``, this one (a
    ``pip install moe-tuning[lmms-eval]`` environment), or the checkout's ``.venv-lmms``."""
    candidate = explicit or os.environ.get(LMMS_PYTHON_ENV)
    if candidate:
        if not Path(candidate).exists():
            raise UserError(f"lmms-eval interpreter {candidate} does not exist")
        return candidate
    if importlib.util.find_spec("lmms_eval") is not None:
        return sys.executable
    venv_python = DEFAULT_LMMS_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    raise UserError(
        "lmms-eval is not installed: run `make setup-lmms` (creates .venv-lmms), or "
        "`pip install moe-tuning[lmms-eval]`, or set $MOE_LLAVA_LMMS_PYTHON"
    )


def offline_env(base: Mapping[str, str] | None = None, *, offline: bool = True) -> dict[str, str]:
    """The subprocess environment: offline for the hub unless asked otherwise."""
    env = dict(os.environ if base is None else base)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_lmms(
    model_dir: str | Path,
    tasks: Sequence[str],
    out_dir: Path,
    *,
    include_paths: Sequence[Path] = (),
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """lmms-eval on ``model_dir``: its results JSON (checked: every task has a numeric result).

    Its output (``<model>/<date>_results.json``, ``<date>_samples_<task>.jsonl``) is left in ``out_dir``.
    """
    # batch_size and device go as lmms-eval's own options (it passes them to the model itself)
    model_args = f"pretrained={model_dir},dtype={dtype}"
    if "," in str(model_dir) or "=" in str(model_dir):
        raise UserError(f"model path {model_dir}: lmms-eval's model_args cannot hold ',' or '='")
    cmd = [
        python or lmms_python(), "-m", RUNNER,
        "--model-args", model_args,
        "--tasks", ",".join(tasks),
        "--output-dir", str(out_dir),
        "--batch-size", str(batch_size),
        "--device", device,
        *[arg for path in include_paths for arg in ("--include-path", str(path))],
        *(["--limit", str(limit)] if limit else []),
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "lmms_eval.log"
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env or os.environ),
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"lmms-eval ran past {timeout_s} s (log: {log_path})") from None
    results_files = sorted(out_dir.glob("*/*_results.json"))
    if proc.returncode != 0 or not results_files:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchmarkError(
            f"lmms-eval failed (exit {proc.returncode}{', no results file' if not results_files else ''}) "
            f"on tasks {', '.join(tasks)}; log {log_path}, last lines:\n{tail}"
        )
    results = json.loads(results_files[-1].read_text())
    check_results(results, tasks)
    return results


def check_results(results: Mapping[str, Any], tasks: Sequence[str]) -> None:
    """Every requested task (or group) has at least one numeric metric; else a BenchmarkError naming them."""
    by_task = results.get("results") or {}
    groups = results.get("groups") or {}
    failed = [t for t in tasks if not task_metrics({**by_task, **groups}.get(t) or {})]
    if failed:
        raise BenchmarkError(f"lmms-eval produced no metric for task(s) {', '.join(failed)}")


def task_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """lmms-eval's ``{"f1,none": 0.8, "f1_stderr,none": "N/A", "alias": ...}`` -> ``{"f1": 0.8, ...}``.

    The filter (``none`` for most tasks) is dropped, another is kept as a suffix (``exact_match/flex``);
    values that are not finite numbers are left out. MLflow names allow no commas.
    """
    metrics: dict[str, float] = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        name, _, filter_name = key.partition(",")
        parts = [name] if filter_name == "none" else [name, filter_name]
        metrics["/".join(metric_name(part) for part in parts)] = float(value)
    return metrics


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``lmms/<task>/<metric>`` for every task and group of a results JSON."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for name, value in task_metrics(values).items():
                flat[f"{METRIC_PREFIX}/{metric_name(task)}/{name}"] = value
    return flat


# ---------------------------------------------------------------------- the table
def released_model(config: Mapping[str, Any] | None) -> str | None:
    """The released MoE-LLaVA model of the paper matching an export's backbone (None: no match)."""
    model_type = ((config or {}).get("text_config") or {}).get("model_type")
    return RELEASED_BY_MODEL_TYPE.get(str(model_type)) if model_type else None


def paper_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, float | None]]:
    """``(column, task, our value in the paper's unit)`` for each paper benchmark that was run."""
    rows = []
    for bench in PAPER_BENCHMARKS:
        prefix = f"{METRIC_PREFIX}/{bench.task}/"
        if not any(k.startswith(prefix) for k in metrics):
            continue
        value = metrics.get(prefix + bench.metric) if bench.metric else None
        rows.append((bench.column, bench.task, None if value is None else value * bench.scale))
    return rows


def format_table(metrics: Mapping[str, float], released: str | None) -> str:
    """The metrics as a text table; the paper benchmarks that ran, beside the paper's numbers."""
    lines = [f"{'metric':<60} {'value':>12}"]
    lines += [f"{name:<60} {value:>12.4f}" for name, value in sorted(metrics.items())]
    rows = paper_rows(metrics)
    if rows:
        models = (
            [released] if released in PAPER_NUMBERS else [m for m in PAPER_NUMBERS if m.startswith("MoE")]
        )
        lines += [
            "",
            f"{'benchmark':<16} {'lmms-eval task':<20} {'ours':>9} " + " ".join(f"{m:>22}" for m in models),
        ]
        for column, task, value in rows:
            paper = [
                f"{PAPER_NUMBERS[m][PAPER_COLUMNS.index(column)]:>22.1f}"
                if column in PAPER_COLUMNS
                else f"{'-':>22}"
                for m in models
            ]
            ours = f"{value:>9.1f}" if value is not None else f"{'(file)':>9}"
            lines.append(f"{column:<16} {task:<20} {ours} " + " ".join(paper))
        lines.append(
            "(paper: VQAv2 test-dev, ours: the task named; MME perception; POPE mean F1 of 3 splits)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command
def registered_version(model: str, client) -> tuple[str, str] | None:
    """``(name, version)`` of a ``models:/name@alias`` or ``models:/name/N`` URI (None: not a registry URI)."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model)
    if not match:
        return None
    name, alias, number = match.groups()
    if number:
        return name, number
    return name, str(client.get_model_version_by_alias(name, alias).version)


def run_benchmark(
    model: str,
    tasks: str | Sequence[str] = "shapesworld",
    *,
    output_dir: str | Path | None = None,
    data_root: str | Path = "data/shapesworld",
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    tracking_uri: str | None = None,
    experiment_name: str = "benchmarks",
    mlflow: bool = True,
    offline: bool = True,
    python: str | None = None,
    timeout_s: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Benchmark ``model`` (an export folder or an MLflow model URI) with lmms-eval; returns
    ``{"metrics", "results", "output_dir", "run_id", "registered_version", "table"}``."""
    from moe_llava.registry.model import URI_SCHEMES, local_export
    from moe_llava.registry.settings import load_settings

    names = expand_tasks(tasks) if isinstance(tasks, str) else list(tasks)
    python = python or lmms_python()
    uri = tracking_uri or (
        load_settings().resolved_tracking_uri() if (mlflow or model.startswith(URI_SCHEMES)) else None
    )
    with ExitStack() as stack:
        out = (
            Path(output_dir)
            if output_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moe-llava-bench-")))
        )
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"--output-dir {out} is not empty (lmms-eval's files of another run would mix in)"
            )
        export = stack.enter_context(local_export(model, tracking_uri=uri))
        config = json.loads((export / "config.json").read_text())
        include = [PAPER_TASKS]
        env = offline_env(offline=offline)
        if any(n.startswith("shapesworld") for n in names):
            include.append(render_shapesworld_tasks(data_root, out / "tasks"))
            env[SHAPESWORLD_IMAGES_ENV] = str(Path(data_root).resolve() / "images")
        log(f"lmms-eval: {', '.join(names)} on {model} ({python})")
        results = run_lmms(
            export, names, out / "lmms", include_paths=include, limit=limit, batch_size=batch_size,
            dtype=dtype, device=device, python=python, env=env, timeout_s=timeout_s,
        )  # fmt: skip
        metrics = flat_metrics(results)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        table = format_table(metrics, released_model(config))
        (out / "table.txt").write_text(table + "\n")
        run_id = version = None
        if mlflow:
            run_id, version = _track(model, names, metrics, out, uri, experiment_name, results, limit)
        log(table)
        summary = {
            "metrics": metrics,
            "results": results.get("results"),
            "output_dir": str(out),
            "run_id": run_id,
            "registered_version": version,
            "table": table,
        }
        if output_dir is None:  # the temporary folder goes; the caller sees what was logged
            summary["output_dir"] = None
        return summary


def _track(model, names, metrics, out: Path, uri, experiment_name, results, limit):
    """The ``benchmark`` MLflow run (metrics, params, the output folder as artifacts ``lmms/``); when
    ``model`` is a registry URI, the metrics go on the version's logged model too, with tags."""
    from mlflow.tracking import MlflowClient

    from moe_llava.registry.registry import ModelRegistry
    from moe_llava.tracking import TrackedRun, git_commit, lock_hash, resolve_parent

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registered = registered_version(model, client)
    tags = {
        "benchmark": "lmms-eval",
        "model": model,
        "tasks": ",".join(names),
        "lmms_eval_version": results.get("lmms_eval_version"),
        "git_commit": git_commit(),
        "lock_hash": lock_hash(REPO_ROOT / "requirements-lmms.lock")
        if (REPO_ROOT / "requirements-lmms.lock").is_file()
        else None,
        "limit": limit,
        **({"registered_model": registered[0], "registered_version": registered[1]} if registered else {}),
    }
    run = TrackedRun.start(
        run_name="benchmark",
        experiment_name=experiment_name,
        uri=uri,
        tags=tags,
        parent_run_id=resolve_parent(),  # a pipeline's run when one started this
    )
    with run:
        run.log_params({"tasks": names, "limit": limit, "model": model})
        if registered:  # the run's metrics are the version's too: logged on its model through this run
            registered_model, version = registered
            ModelRegistry(registered_model, tracking_uri=uri).add_metrics(
                version,
                metrics,
                run_id=run.run_id,
                tags={"benchmark.run_id": run.run_id, "benchmark.tasks": ",".join(names)},
            )
        else:
            run.log_metrics(metrics)
        for name in ("metrics.json", "table.txt"):
            shutil.copy(out / name, out / "lmms" / name)
        run.log_artifacts(out / "lmms", METRIC_PREFIX)
    return run.run_id, registered[1] if registered else None
