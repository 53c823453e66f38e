"""Evaluate a stage's export on the configured benchmarks: the implementation behind
``python -m moe_llava.evaluate`` and ``moe-llava eval run``.

Outputs, under ``<run_dir>/<stage>/eval/`` (or ``evaluation.output_dir``)::

  metrics.json          flat metrics, the same names as the MLflow run's (written atomically, last)
  scores.json           details: confusion counts, per-category results, missing/unknown ids, files
  answers/pope_<split>.jsonl, answers/vqa_<name>.jsonl   the generated answers (LLaVA answers format)
  expert_load.json, expert_load.png                      MoE models: routing by modality per layer
  mlflow_run_id         the ``eval-<stage>`` MLflow run
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_llava.evaluation.expert_load import ExpertLoadRecorder, expert_load_metrics, plot_expert_load
from moe_llava.evaluation.files import EvalFileError, Question, read_questions, write_json, write_jsonl
from moe_llava.evaluation.pope import mean_f1, score_pope
from moe_llava.evaluation.vqa import score_vqa
from moe_llava.training.validation import ConfigError

logger = logging.getLogger(__name__)

BENCHMARKS = ("pope", "vqa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_ID_FILE = "mlflow_run_id"


@dataclass
class Benchmark:
    kind: str  # "pope" | "vqa"
    name: str  # POPE split or VQA set name
    path: Path

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.name}"


# ---------------------------------------------------------------------- configuration
def _names(value: Any, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise ConfigError(key, f"must be a list of names or null, got {value!r}") from None


def validate_eval_config(ev: Mapping[str, Any]) -> None:
    """Check ``evaluation.*`` before any work starts; errors name the key."""
    benchmarks = _names(ev.get("benchmarks"), "evaluation.benchmarks") or []
    if not benchmarks or any(b not in BENCHMARKS for b in benchmarks):
        raise ConfigError(
            "evaluation.benchmarks", f"must be a non-empty subset of {list(BENCHMARKS)}, got {benchmarks}"
        )
    for key in ("batch_size", "max_new_tokens"):
        value = ev.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"evaluation.{key}", f"must be a positive integer, got {value!r}")
    limit = ev.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError("evaluation.limit", f"must be a positive integer or null, got {limit!r}")
    if str(ev.get("dtype", "float32")) not in DTYPES:
        raise ConfigError("evaluation.dtype", f"must be one of {list(DTYPES)}, got {ev.get('dtype')!r}")
    device = str(ev.get("device", "auto"))
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(
                "evaluation.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}"
            ) from None


def plan_benchmarks(cfg: DictConfig) -> list[Benchmark]:
    """The question files to evaluate, from ``data.eval.{pope,vqa}`` and ``evaluation.*``."""
    ev = cfg.evaluation
    eval_data = cfg.data.get("eval") or {}
    plan: list[Benchmark] = []
    for kind, selection_key in (("pope", "pope_splits"), ("vqa", "vqa_sets")):
        if kind not in _names(ev.benchmarks, "evaluation.benchmarks"):
            continue
        files = {str(k): v for k, v in (eval_data.get(kind) or {}).items()}
        wanted = _names(ev.get(selection_key), f"evaluation.{selection_key}")
        if wanted is None:
            wanted = [name for name, path in files.items() if path]
            if not wanted:
                raise ConfigError(
                    f"data.eval.{kind}",
                    f"no {kind.upper()} question file is configured (data {cfg.data.get('name')!r}); "
                    f"set data.eval.{kind}.<name>=FILE or drop {kind!r} from evaluation.benchmarks",
                )
        for name in wanted:
            if not files.get(name):
                raise ConfigError(
                    f"evaluation.{selection_key}",
                    f"{name!r} has no file in data.eval.{kind} (configured: {sorted(n for n, p in files.items() if p)})",
                )
            path = Path(str(files[name]))
            if not path.is_file():
                raise ConfigError(f"data.eval.{kind}.{name}", f"question file not found: {path}")
            plan.append(Benchmark(kind, name, path))
    return plan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _metric_name(text: str) -> str:
    """A string usable inside an MLflow metric name (alphanumerics, ``_ - . /`` and spaces)."""
    return re.sub(r"[^\w\-. ]", "_", text).strip() or "_"


# ---------------------------------------------------------------------- questions -> dataset
def check_questions(questions: Sequence[Question], path: Path, image_folder: str | Path | None) -> None:
    """Structure and image files of every question, before generation; errors name file/line/field."""
    from moe_llava.data.templates import GPT, ROLE_ALIASES
    from moe_llava.data.validation import Validator

    validator = Validator(image_folder=image_folder, image_check="exists")
    bad = []
    for q in questions:
        record = q.record
        if ROLE_ALIASES.get(record["conversations"][-1]["from"]) != GPT:  # a generation prompt
            record = {**record, "conversations": [*record["conversations"], {"from": "gpt", "value": "-"}]}
        check = validator.check_record(record, line=q.line)
        if not check.ok:
            bad.append((q, check.issues[0]))
    if bad:
        q, issue = bad[0]
        more = f" (and {len(bad) - 1} more bad question(s))" if len(bad) > 1 else ""
        raise EvalFileError(
            f"question_id {q.question_id!r}: {issue.reason}: {issue.detail}{more}",
            file=path,
            line=q.line,
            field=issue.field,
        )


class _LocatedDataset(torch.utils.data.Dataset):
    """A generation dataset whose run-time failures (an unreadable image) name the question file and line."""

    def __init__(self, dataset: Any, questions: Sequence[Question], path: Path):
        self.dataset = dataset
        self.lines = {q.question_id: q.line for q in questions}
        self.path = path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from moe_llava.data.errors import DataError

        try:
            return self.dataset[index]
        except DataError as err:
            failures = self.dataset.failures
            qid, reason = failures[-1] if failures else (str(self.dataset.record(index).get("id")), str(err))
            raise EvalFileError(
                f"question_id {qid!r}: cannot be prepared ({reason}; see the log above)",
                file=self.path,
                line=self.lines.get(qid),
            ) from err


def build_dataset(loaded: Any, questions: Sequence[Question], path: Path, *, image_folder, template=None):
    from moe_llava.data.dataset import LlavaDataset

    kwargs = dict(loaded.dataset_kwargs)
    if template:
        kwargs["template"] = template
    dataset = LlavaDataset(
        [q.record for q in questions], loaded.tokenizer, image_folder=image_folder, **kwargs
    )
    return _LocatedDataset(dataset, questions, path)


# ---------------------------------------------------------------------- the run
def _clear_previous_outputs(out_dir: Path) -> None:
    """Remove this runner's own files from an earlier evaluation (a smaller re-run must not mix with them)."""
    for name in ("metrics.json", "scores.json", "expert_load.json", "expert_load.png", RUN_ID_FILE):
        (out_dir / name).unlink(missing_ok=True)
    answers = out_dir / "answers"
    if answers.is_dir():
        for file in [*answers.glob("pope_*.jsonl"), *answers.glob("vqa_*.jsonl")]:
            file.unlink()


def load_benchmark_questions(bench: Benchmark, ev: Mapping, image_folder) -> list[Question]:
    """Read and check one question file (structure, labels/references, image files exist)."""
    questions = read_questions(
        bench.path, kind=bench.kind, prompt_suffix=ev.get("prompt_suffix"), limit=ev.get("limit")
    )
    check_questions(questions, bench.path, image_folder)
    return questions


def evaluate_benchmark(
    loaded, bench: Benchmark, questions: Sequence[Question], ev: Mapping, image_folder, out_dir: Path
) -> dict[str, Any]:
    """Generate answers for one question file, write them, and score them (paired by id)."""
    from moe_llava.inference import generate_answers

    dataset = build_dataset(
        loaded, questions, bench.path, image_folder=image_folder, template=ev.get("template")
    )
    started = time.perf_counter()
    generated = generate_answers(
        loaded,
        dataset,
        batch_size=int(ev.batch_size),
        max_new_tokens=int(ev.max_new_tokens),
        progress=f"{bench.kind} {bench.name}" if ev.get("progress", True) else False,
    )
    seconds = time.perf_counter() - started
    by_id = {a["question_id"]: a["text"] for a in generated}
    prompts = {q.question_id: q.text for q in questions}
    write_jsonl(
        out_dir / "answers" / f"{bench.key}.jsonl",
        ({"question_id": qid, "prompt": prompts.get(qid), "text": text} for qid, text in by_id.items()),
    )
    score = score_pope(questions, by_id) if bench.kind == "pope" else score_vqa(questions, by_id)
    score.update(questions_file=str(bench.path), generation_s=seconds)
    return score


def benchmark_metrics(bench: Benchmark, score: Mapping[str, Any]) -> dict[str, float]:
    prefix = f"{bench.kind}/{_metric_name(bench.name)}"
    if bench.kind == "pope":
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        metrics = {f"{prefix}/{k}": float(score[k]) for k in keys}
    else:
        metrics = {f"{prefix}/accuracy": float(score["accuracy"])}
        for category, stats in score["categories"].items():
            metrics[f"{prefix}/{_metric_name(category)}/accuracy"] = float(stats["accuracy"])
    metrics[f"{prefix}/num_questions"] = score["num_questions"]
    metrics[f"{prefix}/num_missing"] = score["num_missing"]
    return metrics


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``evaluation.model_dir`` (default ``<run_dir>/<stage>/export``; a folder or an MLflow
    model URI such as ``models:/moe-llava@champion``); returns the flat metrics."""
    from moe_llava.inference import load_pretrained
    from moe_llava.registry.model import URI_SCHEMES, local_export
    from moe_llava.training.tracking import data_hash, git_commit, tracking_uri

    requested = str(cfg.evaluation.get("model_dir") or "")
    if requested.startswith(URI_SCHEMES):  # models:/NAME@ALIAS, runs:/...: download, then evaluate the folder
        with local_export(requested, tracking_uri=tracking_uri(cfg.logger)) as export:
            cfg = cfg.copy()
            OmegaConf.update(cfg, "evaluation.model_dir", str(export))
            return run_evaluation(cfg)
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    ev = cfg.evaluation
    validate_eval_config(OmegaConf.to_container(ev))
    stage = str(cfg.stage.name)
    stage_dir = Path(cfg.run_dir) / stage
    model_dir = Path(ev.model_dir) if ev.get("model_dir") else stage_dir / "export"
    out_dir = Path(ev.output_dir) if ev.get("output_dir") else stage_dir / "eval"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            "evaluation.model_dir",
            f"{model_dir} is not a model export (no config.json); train the stage first or set evaluation.model_dir",
        )
    plan = plan_benchmarks(cfg)
    started = time.perf_counter()
    image_folder = cfg.data.get("image_folder")
    # every question file is read and checked before the model loads: a bad line fails in seconds
    questions = {bench.key: load_benchmark_questions(bench, ev, image_folder) for bench in plan}
    dtype = DTYPES[str(ev.get("dtype", "float32"))]
    loaded = load_pretrained(model_dir, device=resolve_device(str(ev.get("device", "auto"))), dtype=dtype)
    model = loaded.model
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_outputs(out_dir)

    run = None
    if ev.get("mlflow", True):
        from moe_llava.evaluation.tracking import EvalRun

        run = EvalRun.start(
            stage=stage,
            stage_dir=stage_dir,
            experiment_name=cfg.experiment_name,
            logger_cfg=cfg.logger,
            parent_run_id=cfg.get("parent_run_id"),
            tags={
                "stage": stage,
                "evaluation": "true",
                "git_commit": git_commit(),
                "data_hash": data_hash(),
                "model_dir": str(model_dir.resolve()),
                "moe": json.dumps(model.config.moe) if model.is_moe else "dense",
            },
        )
    try:
        if run is not None:
            (out_dir / RUN_ID_FILE).write_text(run.run_id)
        record_load = bool(ev.get("expert_load", True)) and model.is_moe
        recorder = ExpertLoadRecorder(model.language_model) if record_load else nullcontext()
        scores: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        generation_s = 0.0
        with recorder:
            for bench in plan:
                score = evaluate_benchmark(loaded, bench, questions[bench.key], ev, image_folder, out_dir)
                scores[bench.key] = score
                metrics.update(benchmark_metrics(bench, score))
                generation_s += score["generation_s"]
                if score["num_missing"] or score["num_unknown"]:
                    logger.warning(
                        "%s: %d question(s) without an answer, %d answer(s) to unknown ids",
                        bench.key,
                        score["num_missing"],
                        score["num_unknown"],
                    )
        pope = {b.name: scores[b.key] for b in plan if b.kind == "pope"}
        if pope:
            metrics["pope/mean_f1"] = mean_f1(pope)
        expert_load = None
        if record_load:
            expert_load = recorder.summary()
            write_json(out_dir / "expert_load.json", expert_load)
            plot_expert_load(
                expert_load, out_dir / "expert_load.png", title=f"expert load: {stage} ({model_dir})"
            )
            metrics.update(expert_load_metrics(expert_load))
        else:
            reason = "dense model (no MoE layer)" if not model.is_moe else "evaluation.expert_load=false"
            logger.info("expert-load analysis skipped: %s", reason)
        num_questions = sum(s["num_questions"] for s in scores.values())
        metrics.update(
            {
                "eval/num_questions": num_questions,
                "eval/num_missing": sum(s["num_missing"] for s in scores.values()),
                "eval/num_unknown": sum(s["num_unknown"] for s in scores.values()),
                "eval/generation_s": generation_s,
                "eval/questions_per_sec": num_questions / generation_s if generation_s else 0.0,
                "eval/wall_time_s": time.perf_counter() - started,
            }
        )
        details = {
            "model_dir": str(model_dir),
            "stage": stage,
            "expert_load": "recorded"
            if record_load
            else ("skipped: dense model" if not model.is_moe else "disabled"),
            "mlflow_run_id": run.run_id if run else None,
            "benchmarks": scores,
        }
        write_json(out_dir / "scores.json", details)
        write_json(out_dir / "metrics.json", metrics)
        if run is not None:
            run.log_params(
                {
                    "evaluation": OmegaConf.to_container(ev),
                    "questions": {b.key: str(b.path) for b in plan},
                    "model_dir": str(model_dir),
                }
            )
            run.log_metrics(metrics)
            run.log_artifacts(out_dir, "eval")
            run.end("FINISHED")
        return metrics
    except KeyboardInterrupt:
        if run is not None:
            run.end("KILLED")
        raise
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
