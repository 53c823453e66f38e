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

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_llava.errors import ConfigError, DataError, EvalFileError
from moe_llava.evaluation.benchmarks import BENCHMARKS, Benchmark, PopeBenchmark
from moe_llava.evaluation.expert_load import ExpertLoadRecorder, expert_load_metrics, plot_expert_load
from moe_llava.evaluation.files import Question, write_json, write_jsonl
from moe_llava.tracking import RUN_ID_FILE, TrackedRun

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    benchmarks = _names(ev.get("benchmarks"), "evaluation.benchmarks")
    if benchmarks is not None and (not benchmarks or any(b not in BENCHMARKS for b in benchmarks)):
        raise ConfigError(
            "evaluation.benchmarks",
            f"must be null (every benchmark with a question file) or a non-empty subset of "
            f"{list(BENCHMARKS)}, got {benchmarks}",
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


def _setting(node: Any, key: str, name: str) -> str:
    """A Hydra override that sets ``<key>.<name>``: ``+`` adds a key the config does not have yet."""
    present = name in (node or {})
    return f"{'' if present else '+'}{key}.{name}=FILE"


def plan_benchmarks(cfg: DictConfig) -> list[Benchmark]:
    """The question files to evaluate, from ``data.eval.{pope,vqa}`` and ``evaluation.*``.

    ``evaluation.benchmarks: null`` runs every kind that has a question file configured (a real
    dataset without VQA files evaluates POPE only); a kind named explicitly must have one.
    """
    ev = cfg.evaluation
    eval_data = cfg.data.get("eval") or {}
    chosen = _names(ev.get("benchmarks"), "evaluation.benchmarks")
    plan: list[Benchmark] = []
    for kind, benchmark in BENCHMARKS.items():
        if chosen is not None and kind not in chosen:
            continue
        selection_key = benchmark.selection_key
        node = eval_data.get(kind) or {}
        files = {str(k): v for k, v in node.items()}
        wanted = _names(ev.get(selection_key), f"evaluation.{selection_key}")
        if wanted is None:
            wanted = [name for name, path in files.items() if path]
            if not wanted and chosen is None:
                continue  # not configured: not evaluated
            if not wanted:
                example = next(iter(files), "test" if kind == "vqa" else "random")
                raise ConfigError(
                    f"data.eval.{kind}",
                    f"no {kind.upper()} question file is configured (data {cfg.data.get('name')!r}); "
                    f"set {_setting(node, f'data.eval.{kind}', example)} "
                    f"or drop {kind!r} from evaluation.benchmarks",
                )
        for name in wanted:
            if not files.get(name):
                raise ConfigError(
                    f"evaluation.{selection_key}",
                    f"{name!r} has no file in data.eval.{kind} (configured: "
                    f"{sorted(n for n, p in files.items() if p)}); set {_setting(node, f'data.eval.{kind}', name)}",
                )
            path = Path(str(files[name]))
            if not path.is_file():
                raise ConfigError(f"data.eval.{kind}.{name}", f"question file not found: {path}")
            plan.append(benchmark(name, path))
    if not plan:
        raise ConfigError(
            "data.eval",
            f"no question file is configured (data {cfg.data.get('name')!r}): set "
            f"{_setting(eval_data.get('pope'), 'data.eval.pope', 'random')} (POPE) or "
            f"{_setting(eval_data.get('vqa'), 'data.eval.vqa', 'test')} (VQA)",
        )
    if eval_data.get("pope_groups") and any(isinstance(b, PopeBenchmark) for b in plan):
        groups = _pope_groups(eval_data.get("pope_groups"))
        for bench in plan:
            if isinstance(bench, PopeBenchmark):
                bench.groups = groups
    return plan


def _pope_groups(node: Any):
    """``data.eval.pope_groups``: a ``question record -> group`` callable built from its ``_target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        groups = instantiate(node)
    except (InstantiationException, ValueError, OSError) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        raise ConfigError("data.eval.pope_groups", str(cause).split("\n")[0]) from None
    if not callable(groups):
        raise ConfigError("data.eval.pope_groups", f"must build a callable, got {type(groups).__name__}")
    return groups


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------- questions -> dataset
class _LocatedDataset(torch.utils.data.Dataset):
    """A generation dataset whose run-time failures (an unreadable image) name the question file and record."""

    def __init__(self, dataset: Any, questions: Sequence[Question], path: Path):
        self.dataset = dataset
        self.locations = {q.question_id: q.location for q in questions}
        self.path = path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DataError as err:
            failures = self.dataset.failures
            qid, reason = failures[-1] if failures else (str(self.dataset.record(index).get("id")), str(err))
            raise EvalFileError(
                f"question_id {qid!r}: cannot be prepared ({reason}; see the log above)",
                file=self.path,
                location=self.locations.get(qid),
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
        for kind in BENCHMARKS:
            for file in answers.glob(f"{kind}_*.jsonl"):
                file.unlink()


def evaluate_benchmark(loaded, bench: Benchmark, ev: Mapping, image_folder, out_dir: Path) -> dict[str, Any]:
    """Generate answers for one loaded question file, write them, and score them (paired by id)."""
    from moe_llava.inference import generate_answers

    questions = bench.questions
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
    asked = {q.question_id: q for q in questions}
    write_jsonl(  # question_id as the question file has it (1, not "1": LLaVA's scripts match it)
        out_dir / "answers" / f"{bench.key}.jsonl",
        (
            {
                "question_id": asked[qid].file_id if qid in asked else qid,
                "prompt": asked[qid].text if qid in asked else None,
                "text": text,
            }
            for qid, text in by_id.items()
        ),
    )
    score = bench.score(by_id)
    score.update(questions_file=str(bench.path), generation_s=seconds)
    return score


def evaluate_plan(
    loaded, plan: Sequence[Benchmark], ev: Mapping, image_folder, out_dir: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every benchmark of the plan: scores by key, and flat metrics per file then per kind."""
    scores: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for bench in plan:
        score = evaluate_benchmark(loaded, bench, ev, image_folder, out_dir)
        scores[bench.key] = score
        metrics.update(bench.metrics(score))
        if score["num_missing"] or score["num_unknown"]:
            logger.warning(
                "%s: %d question(s) without an answer, %d answer(s) to unknown ids",
                bench.key,
                score["num_missing"],
                score["num_unknown"],
            )
    for kind in BENCHMARKS.values():
        metrics.update(kind.summary({b.name: scores[b.key] for b in plan if isinstance(b, kind)}))
    return scores, metrics


def totals(scores: Mapping[str, Mapping[str, Any]], wall_time_s: float) -> dict[str, float]:
    """``eval/*``: question counts and throughput over all benchmarks."""
    num_questions = sum(s["num_questions"] for s in scores.values())
    generation_s = sum((s["generation_s"] for s in scores.values()), 0.0)
    return {
        "eval/num_questions": num_questions,
        "eval/num_missing": sum(s["num_missing"] for s in scores.values()),
        "eval/num_unknown": sum(s["num_unknown"] for s in scores.values()),
        "eval/generation_s": generation_s,
        "eval/questions_per_sec": num_questions / generation_s if generation_s else 0.0,
        "eval/wall_time_s": wall_time_s,
    }


def start_eval_run(cfg: DictConfig, stage: str, stage_dir: Path, tags: Mapping[str, Any]) -> TrackedRun:
    """The ``eval-<stage>`` run, beside the stage's training run.

    It goes into the training run's experiment and nests under the same parent (the pipeline run:
    tag ``mlflow.parentRunId`` of the run whose id the stage folder keeps in ``mlflow_run_id``);
    ``parent_run_id=...`` or ``$MOE_LLAVA_PARENT_RUN_ID`` take precedence. Without a training run
    (an arbitrary ``evaluation.model_dir``) it is a top-level run of ``experiment_name``.
    """
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from moe_llava.tracking import get_run, resolve_parent, tracking_uri

    uri = tracking_uri(cfg.logger)
    id_file = stage_dir / RUN_ID_FILE
    training_run = get_run(MlflowClient(uri), id_file.read_text().strip() if id_file.is_file() else None)
    tags = dict(tags)
    if training_run is not None:
        tags["training_run_id"] = training_run.info.run_id
    return TrackedRun.start(
        run_name=f"eval-{stage}",
        experiment_name=cfg.experiment_name,
        experiment_id=training_run.info.experiment_id if training_run else None,
        logger_cfg=cfg.logger,
        uri=uri,
        tags=tags,
        parent_run_id=resolve_parent(cfg.get("parent_run_id"))
        or (training_run.data.tags.get(MLFLOW_PARENT_RUN_ID) if training_run else None),
    )


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``evaluation.model_dir`` (default ``<run_dir>/<stage>/export``; a folder or an MLflow
    model URI such as ``models:/moe-llava@champion``); returns the flat metrics."""
    from moe_llava.inference import load_pretrained
    from moe_llava.registry.model import URI_SCHEMES, local_export
    from moe_llava.tracking import provenance_tags, require_server, tracking_uri

    requested = str(cfg.evaluation.get("model_dir") or "")
    if cfg.evaluation.get("mlflow", True) or requested.startswith(URI_SCHEMES):  # before any work
        require_server(tracking_uri(cfg.logger), cfg.logger.get("connect_timeout_s"))
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
    # the benchmarks' images: data.eval.image_folder (e.g. COCO val2014 for POPE), else the training images'
    image_folder = (cfg.data.get("eval") or {}).get("image_folder") or cfg.data.get("image_folder")
    # every question file is read and checked before the model loads: a bad line fails in seconds
    for bench in plan:
        bench.load(prompt_suffix=ev.get("prompt_suffix"), limit=ev.get("limit"), image_folder=image_folder)
    dtype = DTYPES[str(ev.get("dtype", "float32"))]
    loaded = load_pretrained(model_dir, device=resolve_device(str(ev.get("device", "auto"))), dtype=dtype)
    model = loaded.model
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_outputs(out_dir)

    run = TrackedRun.inert()
    if ev.get("mlflow", True):
        tags = {
            "stage": stage,
            "evaluation": "true",
            "model_dir": str(model_dir.resolve()),
            **provenance_tags(model),
        }
        run = start_eval_run(cfg, stage, stage_dir, tags)
    with run:  # FINISHED, or KILLED / FAILED with the error
        if run.active:
            (out_dir / RUN_ID_FILE).write_text(run.run_id)
        record_load = bool(ev.get("expert_load", True)) and model.is_moe
        recorder = ExpertLoadRecorder(model.language_model) if record_load else nullcontext()
        with recorder:
            scores, metrics = evaluate_plan(loaded, plan, ev, image_folder, out_dir)
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
        metrics.update(totals(scores, wall_time_s=time.perf_counter() - started))
        details = {
            "model_dir": str(model_dir),
            "stage": stage,
            "expert_load": "recorded"
            if record_load
            else ("skipped: dense model" if not model.is_moe else "disabled"),
            "mlflow_run_id": run.run_id,
            "benchmarks": scores,
        }
        write_json(out_dir / "scores.json", details)
        write_json(out_dir / "metrics.json", metrics)
        run.log_params(
            {
                "evaluation": OmegaConf.to_container(ev),
                "questions": {b.key: str(b.path) for b in plan},
                "model_dir": str(model_dir),
            }
        )
        run.log_metrics(metrics)
        run.log_artifacts(out_dir, "eval")
    return metrics
