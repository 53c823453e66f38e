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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import BeforeValidator, field_validator

from moe_llava.errors import ConfigError, DataError, EvalFileError
from moe_llava.evaluation.benchmarks import BENCHMARKS, Benchmark, PopeBenchmark
from moe_llava.evaluation.expert_load import ExpertLoadRecorder, expert_load_metrics, plot_expert_load
from moe_llava.evaluation.files import Question, write_json, write_jsonl
from moe_llava.schema import ConfigSection
from moe_llava.tracking import RUN_ID_FILE, TrackedRun

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------- configuration
def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise ValueError(f"must be a list of names or null, got {value!r}") from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _positive_int_or_none(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"must be a positive integer or null, got {value!r}")
    return value


Names = Annotated[list[str] | None, BeforeValidator(_names)]
PositiveInt = Annotated[int, BeforeValidator(_positive_int)]


class EvalConfig(ConfigSection):
    """``evaluation`` (``conf/evaluation/default.yaml``), checked before any work starts: errors name the key."""

    KEY: ClassVar[str] = "evaluation"
    model_dir: str | None = None
    output_dir: str | None = None
    benchmarks: Names = None
    pope_splits: Names = None
    vqa_sets: Names = None
    limit: Annotated[int | None, BeforeValidator(_positive_int_or_none)] = None
    batch_size: PositiveInt = 16
    max_new_tokens: PositiveInt = 16
    device: str = "auto"
    dtype: str = "float32"
    prompt_suffix: str | None = None
    template: str | None = None
    expert_load: bool = True
    progress: bool = True
    mlflow: bool = True

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, benchmarks: list[str] | None) -> list[str] | None:
        if benchmarks is not None and (not benchmarks or any(b not in BENCHMARKS for b in benchmarks)):
            raise ValueError(
                f"must be null (every benchmark with a question file) or a non-empty subset of "
                f"{list(BENCHMARKS)}, got {benchmarks}"
            )
        return benchmarks

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, dtype: Any) -> str:
        if str(dtype) not in DTYPES:
            raise ValueError(f"must be one of {list(DTYPES)}, got {dtype!r}")
        return str(dtype)

    @field_validator("device", mode="before")
    @classmethod
    def _torch_device(cls, device: Any) -> str:
        if str(device) != "auto":
            try:
                torch.device(str(device))
            except RuntimeError:
                raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {str(device)!r}") from None
        return str(device)

    def selection(self, key: str) -> list[str] | None:
        """``evaluation.<key>`` of a benchmark kind (``pope_splits``, ``vqa_sets``)."""
        return getattr(self, key)


def _setting(node: Any, key: str, name: str) -> str:
    """A Hydra override that sets ``<key>.<name>``: ``+`` adds a key the config does not have yet."""
    present = name in (node or {})
    return f"{'' if present else '+'}{key}.{name}=FILE"


def eval_config(cfg: DictConfig) -> EvalConfig:
    """``cfg.evaluation``, resolved and checked."""
    return EvalConfig.of(OmegaConf.to_container(cfg.evaluation, resolve=True))


def plan_benchmarks(cfg: DictConfig, ev: EvalConfig | None = None) -> list[Benchmark]:
    """The question files to evaluate, from ``data.eval.{pope,vqa}`` and ``evaluation.*`` (``ev``;
    default: checked from ``cfg.evaluation``).

    ``evaluation.benchmarks: null`` runs every kind that has a question file configured (a real
    dataset without VQA files evaluates POPE only); a kind named explicitly must have one.
    """
    ev = ev or eval_config(cfg)
    eval_data = cfg.data.get("eval") or {}
    chosen = ev.benchmarks
    plan: list[Benchmark] = []
    for kind, benchmark in BENCHMARKS.items():
        if chosen is not None and kind not in chosen:
            continue
        selection_key = benchmark.selection_key
        node = eval_data.get(kind) or {}
        files = {str(k): v for k, v in node.items()}
        wanted = ev.selection(selection_key)
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


def evaluate_benchmark(
    loaded, bench: Benchmark, ev: EvalConfig, image_folder, out_dir: Path
) -> dict[str, Any]:
    """Generate answers for one loaded question file, write them, and score them (paired by id)."""
    from moe_llava.inference import generate_answers

    questions = bench.questions
    dataset = build_dataset(loaded, questions, bench.path, image_folder=image_folder, template=ev.template)
    started = time.perf_counter()
    generated = generate_answers(
        loaded,
        dataset,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        progress=f"{bench.kind} {bench.name}" if ev.progress else False,
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
    loaded, plan: Sequence[Benchmark], ev: EvalConfig, image_folder, out_dir: Path
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


@contextmanager
def model_source(ev: EvalConfig, stage_dir: Path, uri: str) -> Iterator[Path]:
    """The export to evaluate: ``evaluation.model_dir`` (default ``<stage_dir>/export``), or the
    export of an MLflow model URI (``models:/NAME@ALIAS``, ``runs:/...``) downloaded for the block."""
    from moe_llava.registry.model import URI_SCHEMES, local_export

    if ev.model_dir and ev.model_dir.startswith(URI_SCHEMES):
        with local_export(ev.model_dir, tracking_uri=uri) as export:
            yield export
        return
    model_dir = Path(ev.model_dir) if ev.model_dir else stage_dir / "export"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            "evaluation.model_dir",
            f"{model_dir} is not a model export (no config.json); train the stage first or set evaluation.model_dir",
        )
    yield model_dir


def load_questions(cfg: DictConfig, ev: EvalConfig) -> tuple[list[Benchmark], Any]:
    """The plan's question files, read and checked (a bad line fails in seconds, before the model
    loads), and the benchmarks' image folder: ``data.eval.image_folder`` (e.g. COCO val2014 for
    POPE), else the training images'."""
    plan = plan_benchmarks(cfg, ev)
    image_folder = (cfg.data.get("eval") or {}).get("image_folder") or cfg.data.get("image_folder")
    for bench in plan:
        bench.load(prompt_suffix=ev.prompt_suffix, limit=ev.limit, image_folder=image_folder)
    return plan, image_folder


def measure(loaded, plan, ev: EvalConfig, image_folder, out_dir: Path, title: str) -> tuple[dict, dict, str]:
    """Scores by benchmark, the flat metrics (expert load of an MoE model included) and what
    became of the expert-load analysis."""
    model = loaded.model
    record_load = ev.expert_load and model.is_moe
    recorder = ExpertLoadRecorder(model.language_model) if record_load else nullcontext()
    with recorder:
        scores, metrics = evaluate_plan(loaded, plan, ev, image_folder, out_dir)
    if record_load:
        expert_load = recorder.summary()
        write_json(out_dir / "expert_load.json", expert_load)
        plot_expert_load(expert_load, out_dir / "expert_load.png", title=f"expert load: {title}")
        metrics.update(expert_load_metrics(expert_load))
        return scores, metrics, "recorded"
    reason = "dense model (no MoE layer)" if not model.is_moe else "evaluation.expert_load=false"
    logger.info("expert-load analysis skipped: %s", reason)
    return scores, metrics, "skipped: dense model" if not model.is_moe else "disabled"


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``evaluation.model_dir`` (default ``<run_dir>/<stage>/export``; a folder or an MLflow
    model URI such as ``models:/moe-llava@champion``); returns the flat metrics."""
    from moe_llava.inference import load_pretrained
    from moe_llava.registry.model import URI_SCHEMES
    from moe_llava.tracking import provenance_tags, require_server, tracking_uri

    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    ev = eval_config(cfg)
    uri = tracking_uri(cfg.logger)
    if ev.mlflow or (ev.model_dir or "").startswith(URI_SCHEMES):  # before any work
        require_server(uri, cfg.logger.get("connect_timeout_s"))
    stage = str(cfg.stage.name)
    stage_dir = Path(cfg.run_dir) / stage
    out_dir = Path(ev.output_dir) if ev.output_dir else stage_dir / "eval"

    with model_source(ev, stage_dir, uri) as model_dir:
        started = time.perf_counter()
        plan, image_folder = load_questions(cfg, ev)
        loaded = load_pretrained(model_dir, device=resolve_device(ev.device), dtype=DTYPES[ev.dtype])
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_previous_outputs(out_dir)

        run = TrackedRun.inert()
        if ev.mlflow:
            tags = {
                "stage": stage,
                "evaluation": "true",
                "model_dir": str(model_dir.resolve()),
                **provenance_tags(loaded.model),
            }
            run = start_eval_run(cfg, stage, stage_dir, tags)
        with run:  # FINISHED, or KILLED / FAILED with the error
            if run.active:
                (out_dir / RUN_ID_FILE).write_text(run.run_id)
            scores, metrics, expert_load = measure(
                loaded, plan, ev, image_folder, out_dir, title=f"{stage} ({model_dir})"
            )
            metrics.update(totals(scores, wall_time_s=time.perf_counter() - started))
            details = {
                "model_dir": str(model_dir),
                "stage": stage,
                "expert_load": expert_load,
                "mlflow_run_id": run.run_id,
                "benchmarks": scores,
            }
            write_json(out_dir / "scores.json", details)
            write_json(out_dir / "metrics.json", metrics)
            run.log_params(
                {
                    "evaluation": ev.model_dump(),
                    "questions": {b.key: str(b.path) for b in plan},
                    "model_dir": str(model_dir),
                }
            )
            run.log_metrics(metrics)
            run.log_artifacts(out_dir, "eval")
    return metrics
