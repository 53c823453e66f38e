"""Run one MoE-Tuning stage from a composed config: the single implementation behind
``python -m moe_llava.train``, ``moe-llava train``, DVC and Prefect.

Outputs, under ``<run_dir>/<stage>/``:
  export/        the stage's weights (safetensors), tokenizer and image processor: the next stage's input
                 (a LoRA stage merges its adapters into it; with lora.export=adapter it holds the PEFT
                 adapters instead, which `moe-llava model merge-lora` turns into such an export)
  checkpoints/   Lightning checkpoints for resuming this stage (``last.ckpt``)
  data/          prepared manifests, quarantine files and counts
  metrics.json   final losses, steps, wall time (DVC-trackable)
  logs/          Lightning's CSV log (metrics.csv: the loss curves `dvc plots` draws)
  COMPLETED      written last; a stage without it was interrupted (or a write failed) and resumes on
                 the next run; exports and checkpoints are swapped in whole (moe_llava.atomic)
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_llava.atomic import write_dir, write_file
from moe_llava.config import resolved
from moe_llava.data.config import stage_config, tokenizer_from_config
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.errors import ConfigError
from moe_llava.model.builder import build_image_processor
from moe_llava.model.checkpoint import check_export_config
from moe_llava.model.lora import merge_adapter, merge_lora, save_adapter, trainable_counts
from moe_llava.tracking import (
    bound_http_retries,
    data_hash,
    provenance_tags,
    require_server,
    start_stage_run,
    tracking_uri,
)
from moe_llava.training.callbacks import AtomicCheckpointIO
from moe_llava.training.datamodule import LlavaDataModule
from moe_llava.training.lit_module import MoELlavaLitModule
from moe_llava.training.loggers import BufferedMLFlowLogger
from moe_llava.training.preflight import preflight
from moe_llava.training.stages import (
    apply_stage_lora,
    configure_trainable,
    load_stage_model,
    previous_stage,
    split_moe_settings,
)
from moe_llava.training.strategies import build_strategy, is_checkpoint_io_compatible
from moe_llava.training.validation import (
    DataConfig,
    LoraConfig,
    MoEConfig,
    StageConfig,
    StageSettings,
    accumulation_steps,
    validate_stage_config,
)

COMPLETED = "COMPLETED"
log = logging.getLogger(__name__)


def stage_paths(cfg: DictConfig) -> dict[str, Path]:
    stage_dir = Path(cfg.run_dir) / cfg.stage.name
    prev = previous_stage(cfg.stage.name)
    init = cfg.get("init_from") or (Path(cfg.run_dir) / prev / "export" if prev else None)
    return {
        "stage_dir": stage_dir,
        "export": stage_dir / "export",
        "checkpoints": stage_dir / "checkpoints",
        "data": stage_dir / "data",
        "init": Path(init) if init else None,
    }


def load_model_and_processors(
    model_cfg: DictConfig,
    data_cfg: DictConfig,
    stage: StageConfig,
    moe: MoEConfig,
    init_dir: Path | None,
    processors: tuple[Any, Any] | None = None,
):
    """The stage's model (built from ``model_cfg`` or loaded from ``init_dir``, upcycled with ``moe``
    when the stage says so), its tokenizer and image processor (``processors``: already loaded), and
    where the model came from."""
    moe_settings, coefficients = split_moe_settings(moe.model_dump())
    if processors is not None:
        tokenizer, image_processor = processors
    elif init_dir is None:  # stage 1 (or a later stage without a previous export): the recipe
        default_tokenizer = model_cfg.language_model.get("name_or_path")
        tokenizer = tokenizer_from_config(data_cfg, default=default_tokenizer)
        image_processor = build_image_processor(model_cfg.vision_tower, pretrained=model_cfg.pretrained)
    else:
        from transformers import AutoImageProcessor

        tokenizer = load_tokenizer(init_dir)
        image_processor = AutoImageProcessor.from_pretrained(str(init_dir), trust_remote_code=False)
    model, origin = load_stage_model(
        stage.name,
        init_dir,
        lambda: instantiate(model_cfg, tokenizer=tokenizer),
        upcycle=stage.upcycle,
        moe_settings=moe_settings,
    )
    if model.is_moe:  # the moe group is their only source (a dense stage does not read it)
        for key, value in coefficients.items():
            setattr(model.config, key, value)
    return model, tokenizer, image_processor, origin


def record_prompt_format(model_config, data: DataConfig, stage: str) -> None:
    """Store the stage's template and image preparation in the model config (inference reads them)."""
    node = data.stages[stage]
    model_config.conversation_template = node.template
    model_config.image_aspect = node.image_aspect
    model_config.pad_color = data.pad_color


def export_stage(
    model, tokenizer, image_processor, export_dir: Path, dtype=None, max_shard_size: int | str = "5GB"
) -> None:
    """save_pretrained everything the next stage needs, atomically: a half-written export never
    looks done, and a failed write (:class:`~moe_llava.errors.WriteFailed`) keeps the previous one.

    ``dtype``: the weights' type on disk (None: as they are; routers stay float32); safetensors
    shards of at most ``max_shard_size`` (one file below it, else shards and an index)."""
    from moe_llava.model.checkpoint import save_weights

    def save(folder: Path) -> None:
        save_weights(model, folder, dtype=dtype, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)

    write_dir(export_dir, save, "stage export")


def export_lora_stage(
    peft_model, lora: LoraConfig, tokenizer, image_processor, paths: dict, **written: Any
) -> None:
    """The export of a LoRA stage: merged into a plain export (``lora.export=merged``), or the
    adapters alone in the PEFT format (``adapter``; ``moe-llava model merge-lora`` merges them).

    A QLoRA stage's merged export is rebuilt from the stage's full-precision start (its 4-bit
    weights are not the weights the next stage should get): the adapters are merged into it.
    ``written``: dtype and shard size of a merged export (:func:`export_stage`).
    """
    if lora.export == "adapter":

        def save(folder: Path) -> None:
            save_adapter(peft_model, folder)
            tokenizer.save_pretrained(folder)
            image_processor.save_pretrained(folder)

        write_dir(paths["export"], save, "stage export (adapters)")
    elif lora.quantize:
        if paths["init"] is None:
            raise ConfigError("lora.quantize", "a QLoRA stage needs an export to start from (init_from)")
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(peft_model, tmp)
            merged = merge_adapter(paths["init"], tmp)
            export_stage(merged, tokenizer, image_processor, paths["export"], **written)
    else:
        export_stage(merge_lora(peft_model), tokenizer, image_processor, paths["export"], **written)


def _init_is_moe(init_dir: Path | None) -> bool:
    return init_dir is not None and bool(check_export_config(init_dir).get("moe"))


def run_stage(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train ``cfg.stage`` and export it; ``callbacks`` are added to the Trainer's (programmatic use)."""
    cfg = resolved(cfg)
    settings = validate_stage_config(cfg)
    L.seed_everything(settings.seed, workers=True)
    paths = stage_paths(cfg)
    started = time.perf_counter()
    _require_tracking_server(cfg.logger)
    # everything else that can fail (strategy, weights' sources, tokenizer, the data), before the
    # model loads and before the MLflow run; rank 0 prepares the data
    prepared = preflight(cfg, paths["init"], paths["data"], prepare_data=_is_rank_zero())
    resume = _resume_or_start_over(cfg, paths)

    model, tokenizer, image_processor, origin = load_model_and_processors(
        cfg.model,
        cfg.data,
        settings.stage,
        settings.moe,
        paths["init"],
        (prepared.tokenizer, prepared.image_processor),
    )
    peft_model, trainable_parts = _make_trainable(model, cfg, settings, paths["init"])
    if resume:
        _set_interrupted_log_aside(paths)
    run = _start_run(cfg, paths, resume, model, origin)
    with run:  # FINISHED, or KILLED / FAILED with the error
        _log_run_inputs(run, cfg, trainable_parts)
        trainer = build_trainer(cfg, settings.stage, model, paths, run.run_id, callbacks or [])
        datamodule = LlavaDataModule(
            cfg.data,
            settings.stage.name,
            paths["data"],
            tokenizer=tokenizer,
            image_processor=image_processor,
            num_image_tokens=model.num_image_tokens,
            micro_batch_size=settings.stage.micro_batch_size,
            num_workers=settings.data.num_workers,
            seed=settings.seed,
        )
        module = MoELlavaLitModule(
            model,
            lr=settings.stage.lr,
            weight_decay=settings.stage.weight_decay,
            warmup_ratio=settings.stage.warmup_ratio,
            lr_scale=settings.stage.lr_scale,
        )
        result = _fit(trainer, module, datamodule, paths["checkpoints"] / "last.ckpt" if resume else None)
        if _is_rank_zero():
            _join_logs(trainer, result, paths)
            _export(model, peft_model, tokenizer, image_processor, cfg, settings, paths)
            result.update(
                trainable_parameters=trainable_parts["total"],
                wall_time_s=time.perf_counter() - started,
                resumed=resume,
            )
            _record_completion(run, result, cfg.logger, paths)
    _warn_unsent(run, paths)
    return result


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def _require_tracking_server(logger_cfg: DictConfig) -> None:
    """Before any work: a tracking server that is down is an error now, not after training."""
    bound_http_retries(logger_cfg.get("http"))
    if _is_rank_zero():
        require_server(tracking_uri(logger_cfg), logger_cfg.get("connect_timeout_s"))


def _resume_or_start_over(cfg: DictConfig, paths: dict[str, Path]) -> bool:
    """Whether the stage resumes from its last checkpoint; a fresh attempt removes stale checkpoints."""
    completed_marker = paths["stage_dir"] / COMPLETED
    last_ckpt = paths["checkpoints"] / "last.ckpt"
    resume = cfg.resume == "auto" and last_ckpt.is_file() and not completed_marker.exists()
    if not resume and _is_rank_zero():  # stale checkpoints must not leak into a fresh attempt
        shutil.rmtree(paths["checkpoints"], ignore_errors=True)
        completed_marker.unlink(missing_ok=True)
    return resume


def _make_trainable(model, cfg: DictConfig, settings: StageSettings, init_dir: Path | None):
    """Freeze all but the stage's trainable set (through LoRA adapters when ``lora.enabled``):
    the PEFT model (None without LoRA) and the trainable parameter counts per part."""
    stage = settings.stage
    trainable = configure_trainable(model, stage.trainable, cfg.get("train_modules"))
    peft_model = apply_stage_lora(
        model,
        settings.lora.model_dump(),
        trainable,
        fresh_routers=model.is_moe and not _init_is_moe(init_dir),
    )
    counts = trainable_counts(model)
    if _is_rank_zero():
        log.info(
            "%s trains %s parameters (%s frozen): %s",
            stage.name,
            f"{counts['total']:,}",
            f"{counts['frozen']:,}",
            ", ".join(f"{k} {v:,}" for k, v in counts.items() if k not in ("total", "frozen")),
        )
    if stage.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns, and goes in v6); older 5.x only has the old one.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    return peft_model, counts


def _csv_logs(paths: dict[str, Path]) -> tuple[Path, Path]:
    """This attempt's CSV log and the interrupted attempts' one."""
    csv_log = paths["stage_dir"] / "logs" / "metrics.csv"
    return csv_log, csv_log.with_name("metrics.interrupted.csv")


def _set_interrupted_log_aside(paths: dict[str, Path]) -> None:
    """Lightning's CSV logger would start the file over: the interrupted attempt's rows are kept aside."""
    csv_log, earlier_log = _csv_logs(paths)
    if csv_log.is_file() and _is_rank_zero():
        if earlier_log.is_file():  # killed again before the two were joined: keep every attempt
            join_interrupted_log(earlier_log, csv_log)
        csv_log.replace(earlier_log)


def _start_run(cfg: DictConfig, paths: dict[str, Path], resume: bool, model, origin: str):
    stage = cfg.stage.name
    return start_stage_run(
        stage_dir=paths["stage_dir"],
        stage=stage,
        experiment_name=cfg.experiment_name,
        logger_cfg=cfg.logger,
        resume=resume,
        parent_run_id=cfg.get("parent_run_id"),
        tags={"stage": stage, "model_origin": origin, **provenance_tags(model)},
        is_global_zero=_is_rank_zero(),
    )


def _log_run_inputs(run, cfg: DictConfig, trainable_parts: dict[str, int]) -> None:
    """The config, the datasets (a resumed run has them) and the trainable parameter counts."""
    run.log_config(OmegaConf.to_container(cfg), OmegaConf.to_yaml(cfg))
    if not run.resumed:
        data_version = data_hash()
        data_node = stage_config(cfg.data, cfg.stage.name)
        for split, context in (("train", "training"), ("val", "validation")):
            if data_node.get(split):
                name = f"{cfg.data.get('name', 'data')}/{Path(data_node[split]).stem}"
                run.log_dataset(data_node[split], name, data_version, context)
    run.log_metrics({"trainable_parameters": trainable_parts["total"]})
    run.log_params({"trainable": trainable_parts})  # per part and kind: trainable.experts.lora ...


def _join_logs(trainer: L.Trainer, result: dict[str, Any], paths: dict[str, Path]) -> None:
    """One logs/metrics.csv for the stage, whatever its attempts and however few its steps."""
    csv_log, earlier_log = _csv_logs(paths)
    if earlier_log.is_file():
        join_interrupted_log(earlier_log, csv_log)
    if not csv_log.is_file():  # fewer steps than trainer.log_every_n_steps: the final values
        log_final_step(trainer, result)


def _export(model, peft_model, tokenizer, image_processor, cfg, settings: StageSettings, paths) -> None:
    """The stage's export (with its prompt format), as ``export`` and ``lora.export`` say."""
    record_prompt_format(model.config, settings.data, settings.stage.name)
    written = {
        "dtype": export_dtype(settings.export.dtype, cfg.trainer.get("precision")),
        "max_shard_size": settings.export.max_shard_size,
    }
    if peft_model is None:
        export_stage(model, tokenizer, image_processor, paths["export"], **written)
    else:
        export_lora_stage(peft_model, settings.lora, tokenizer, image_processor, paths, **written)


def _record_completion(run, result: dict[str, Any], logger_cfg: DictConfig, paths: dict[str, Path]) -> None:
    """metrics.json, the run's summary and export, then the COMPLETED marker (last: it means done)."""
    (paths["stage_dir"] / "metrics.json").write_text(json.dumps(result, indent=2))
    # Summary numbers only: the per-step series (train/loss ...) were logged during training.
    run.log_metrics({k: v for k, v in result.items() if "/" not in k and _is_number(v)})
    log_export(run, paths["export"], logger_cfg)
    (paths["stage_dir"] / COMPLETED).write_text(run.run_id or "")


def _warn_unsent(run, paths: dict[str, Path]) -> None:
    if run.unsent:
        log.warning(
            "stage %s is complete in %s (metrics.json, logs/metrics.csv, export/), but MLflow run %s "
            "misses what it could not take: %s",
            paths["stage_dir"].name,
            paths["stage_dir"],
            run.run_id,
            "; ".join(run.unsent),
        )


def export_dtype(setting: str | None, precision: Any):
    """``export.dtype`` (checked: validation.EXPORT_DTYPES) as a torch dtype: ``auto`` is the
    training precision's compute type."""
    import torch

    setting = str(setting or "auto")
    if setting == "auto":
        text = str(precision or "32-true")
        setting = "bfloat16" if text.startswith("bf16") else "float16" if text.startswith("16") else "float32"
    return getattr(torch, setting)


def log_export(run, export_dir: Path, logger_cfg: DictConfig) -> None:
    """Copy the export into the run's artifacts when ``logger.log_model_weights`` and it is at most
    ``logger.log_model_weights_max_mb``; a larger one is referenced (tags ``export_dir``,
    ``export_bytes``): the registry's model is then the only copy in MLflow."""
    size = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file())
    run.set_tags({"export_dir": str(export_dir.resolve()), "export_bytes": size})
    limit = logger_cfg.get("log_model_weights_max_mb", None)
    if logger_cfg.get("log_model_weights", True) and (limit is None or size <= float(limit) * 2**20):
        run.log_artifacts(export_dir, "export")
    elif logger_cfg.get("log_model_weights", True):
        log.info(
            "export %s (%.1f GB) not copied to MLflow (logger.log_model_weights_max_mb=%s): tagged export_dir",
            export_dir,
            size / 1e9,
            limit,
        )


def log_final_step(trainer: L.Trainer, result: dict[str, Any]) -> None:
    """Write the last step's values through the CSV logger (a stage shorter than
    ``trainer.log_every_n_steps`` logged none, and logs/metrics.csv is a declared output)."""
    values = {k: v for k, v in result.items() if "/" in k and _is_number(v)}
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.log_metrics(values, step=max(int(result.get("global_step", 1)) - 1, 0))
            logger.save()


def build_trainer(
    cfg: DictConfig,
    stage: StageConfig,
    model,
    paths: dict[str, Path],
    run_id: str | None,
    extra_callbacks: list[L.Callback],
) -> L.Trainer:
    """The Trainer of ``cfg.trainer``, with ``cfg.callbacks`` and ``cfg.logger.loggers``, all instantiated
    from config. The stage supplies its schedule and folders, the run its MLflow run, and the model
    the strategy's wrap policy (:func:`build_strategy`)."""
    strategy = build_strategy(cfg.trainer.get("strategy", "auto"), model)
    at_run_time = {
        "model_checkpoint": {
            "dirpath": str(paths["checkpoints"]),
            "every_n_train_steps": stage.checkpoint_every_n_steps,
        },
        "progress_bar": {"enabled": bool(cfg.trainer.enable_progress_bar)},
        # every rank: the MLflow logger builds a client even where it logs nothing
        "mlflow": {"tracking_uri": tracking_uri(cfg.logger), "run_id": run_id},
        "csv": {"save_dir": str(paths["stage_dir"])},
    }
    callbacks = [
        instantiate(node, **at_run_time.get(name, {})) for name, node in cfg.callbacks.items() if node
    ]
    loggers = [
        instantiate(node, **at_run_time.get(name, {})) for name, node in cfg.logger.loggers.items() if node
    ]
    csv = next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)
    for logger in loggers:  # where the metrics MLflow did not take are kept
        if isinstance(logger, BufferedMLFlowLogger) and csv is not None:
            logger.local_copy = str(Path(csv.log_dir) / "metrics.csv")
    trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        max_epochs=stage.epochs,
        max_steps=stage.max_steps,
        gradient_clip_val=stage.max_grad_norm or None,
        val_check_interval=stage.val_every_n_steps,
        logger=loggers,
        callbacks=[c for c in callbacks if c is not None] + list(extra_callbacks),
        plugins=[AtomicCheckpointIO()] if is_checkpoint_io_compatible(strategy) else None,
        default_root_dir=str(paths["stage_dir"]),
    )
    trainer.accumulate_grad_batches = accumulation_steps(stage, trainer.world_size)
    return trainer


def join_interrupted_log(earlier: Path, current: Path) -> None:
    """One CSV log for a resumed stage: the interrupted attempt's rows before the step the resumed
    attempt started from (later ones were rolled back with the checkpoint), then the resumed rows."""
    with earlier.open(newline="") as f:
        old = list(csv.DictReader(f))
    new = []
    if current.is_file():
        with current.open(newline="") as f:
            new = list(csv.DictReader(f))
    first = min((int(row["step"]) for row in new if row.get("step")), default=None)
    rows = [row for row in old if first is None or int(row["step"]) < first] + new
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def save(file: Path) -> None:
        with file.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_file(current, save, "training log")
    earlier.unlink()


def _fit(trainer: L.Trainer, module, datamodule, ckpt_path: Path | None) -> dict[str, Any]:
    module.model.train()  # `from_pretrained` returns eval mode, and Lightning keeps the modes it finds
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {"global_step": trainer.global_step, "epochs": trainer.current_epoch, **metrics}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
