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
from moe_llava.training.validation import accumulation_steps, validate_stage_config

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
    moe_cfg: DictConfig,
    data_cfg: DictConfig,
    stage_cfg: DictConfig,
    init_dir: Path | None,
    processors: tuple[Any, Any] | None = None,
):
    """The stage's model (built from ``model_cfg`` or loaded from ``init_dir``, upcycled with ``moe_cfg``
    when the stage says so), its tokenizer and image processor (``processors``: already loaded), and
    where the model came from."""
    moe_settings, coefficients = split_moe_settings(OmegaConf.to_container(moe_cfg))
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
        stage_cfg.name,
        init_dir,
        lambda: instantiate(model_cfg, tokenizer=tokenizer),
        upcycle=bool(stage_cfg.upcycle),
        moe_settings=moe_settings,
    )
    if model.is_moe:  # the moe group is their only source (a dense stage does not read it)
        for key, value in coefficients.items():
            setattr(model.config, key, value)
    return model, tokenizer, image_processor, origin


def record_prompt_format(model_config, data_cfg: DictConfig, stage: str) -> None:
    """Store the stage's template and image preparation in the model config (inference reads them)."""
    node = stage_config(data_cfg, stage)
    model_config.conversation_template = str(node.get("template", "phi"))
    model_config.image_aspect = str(node.get("image_aspect", "pad"))
    pad_color = data_cfg.get("pad_color")
    model_config.pad_color = None if pad_color is None else [int(c) for c in pad_color]


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
    peft_model, lora_cfg: DictConfig, tokenizer, image_processor, paths: dict, **written: Any
) -> None:
    """The export of a LoRA stage: merged into a plain export (``lora.export=merged``), or the
    adapters alone in the PEFT format (``adapter``; ``moe-llava model merge-lora`` merges them).

    A QLoRA stage's merged export is rebuilt from the stage's full-precision start (its 4-bit
    weights are not the weights the next stage should get): the adapters are merged into it.
    ``written``: dtype and shard size of a merged export (:func:`export_stage`).
    """
    if lora_cfg.export == "adapter":

        def save(folder: Path) -> None:
            save_adapter(peft_model, folder)
            tokenizer.save_pretrained(folder)
            image_processor.save_pretrained(folder)

        write_dir(paths["export"], save, "stage export (adapters)")
    elif lora_cfg.get("quantize"):
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
    validate_stage_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    stage = cfg.stage.name
    paths = stage_paths(cfg)
    started = time.perf_counter()
    bound_http_retries(cfg.logger.get("http"))
    if rank_zero_only.rank == 0:  # before any work: a tracking server that is down is an error now
        require_server(tracking_uri(cfg.logger), cfg.logger.get("connect_timeout_s"))

    # everything else that can fail (strategy, weights' sources, tokenizer, the data), before the
    # model loads and before the MLflow run; rank 0 prepares the data
    prepared = preflight(cfg, paths["init"], paths["data"], prepare_data=rank_zero_only.rank == 0)

    completed_marker = paths["stage_dir"] / COMPLETED
    last_ckpt = paths["checkpoints"] / "last.ckpt"
    resume = cfg.resume == "auto" and last_ckpt.is_file() and not completed_marker.exists()
    if not resume and rank_zero_only.rank == 0:  # a fresh attempt: stale checkpoints must not leak in
        shutil.rmtree(paths["checkpoints"], ignore_errors=True)
        completed_marker.unlink(missing_ok=True)

    model, tokenizer, image_processor, origin = load_model_and_processors(
        cfg.model, cfg.moe, cfg.data, cfg.stage, paths["init"], (prepared.tokenizer, prepared.image_processor)
    )
    trainable = configure_trainable(model, cfg.stage.trainable, cfg.get("train_modules"))
    peft_model = apply_stage_lora(
        model, cfg.get("lora"), trainable, fresh_routers=model.is_moe and not _init_is_moe(paths["init"])
    )
    trainable_parts = trainable_counts(model)
    if rank_zero_only.rank == 0:
        log.info(
            "%s trains %s parameters (%s frozen): %s",
            stage,
            f"{trainable_parts['total']:,}",
            f"{trainable_parts['frozen']:,}",
            ", ".join(f"{k} {v:,}" for k, v in trainable_parts.items() if k not in ("total", "frozen")),
        )
    if cfg.stage.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns, and goes in v6); older 5.x only has the old one.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()

    csv_log = paths["stage_dir"] / "logs" / "metrics.csv"
    earlier_log = csv_log.with_name("metrics.interrupted.csv")
    if resume and csv_log.is_file() and rank_zero_only.rank == 0:
        if earlier_log.is_file():  # killed again before the two were joined: keep every attempt
            join_interrupted_log(earlier_log, csv_log)
        csv_log.replace(earlier_log)  # Lightning's CSV logger would start the file over
    data_version = data_hash()
    run = start_stage_run(
        stage_dir=paths["stage_dir"],
        stage=stage,
        experiment_name=cfg.experiment_name,
        logger_cfg=cfg.logger,
        resume=resume,
        parent_run_id=cfg.get("parent_run_id"),
        tags={
            "stage": stage,
            "model_origin": origin,
            **provenance_tags(model),
        },
        is_global_zero=rank_zero_only.rank == 0,
    )
    with run:  # FINISHED, or KILLED / FAILED with the error
        run.log_config(OmegaConf.to_container(cfg), OmegaConf.to_yaml(cfg))
        if not run.resumed:
            data_node = stage_config(cfg.data, stage)
            for split, context in (("train", "training"), ("val", "validation")):
                if data_node.get(split):
                    name = f"{cfg.data.get('name', 'data')}/{Path(data_node[split]).stem}"
                    run.log_dataset(data_node[split], name, data_version, context)
        counts = {"trainable_parameters": trainable_parts["total"]}
        run.log_metrics(counts)
        run.log_params({"trainable": trainable_parts})  # per part and kind: trainable.experts.lora ...
        trainer = build_trainer(cfg, model, paths, run.run_id, callbacks or [])
        datamodule = LlavaDataModule(
            cfg.data,
            stage,
            paths["data"],
            tokenizer=tokenizer,
            image_processor=image_processor,
            num_image_tokens=model.num_image_tokens,
            micro_batch_size=int(cfg.stage.micro_batch_size),
            num_workers=int(cfg.data.get("num_workers", 0)),
            seed=int(cfg.seed),
        )
        module = MoELlavaLitModule(
            model,
            lr=float(cfg.stage.lr),
            weight_decay=float(cfg.stage.weight_decay),
            warmup_ratio=float(cfg.stage.warmup_ratio),
            lr_scale={str(k): float(v) for k, v in (cfg.stage.get("lr_scale") or {}).items()},
        )
        result = _fit(trainer, module, datamodule, paths["checkpoints"] / "last.ckpt" if resume else None)
        if rank_zero_only.rank == 0:
            if earlier_log.is_file():
                join_interrupted_log(earlier_log, csv_log)
            if not csv_log.is_file():  # fewer steps than trainer.log_every_n_steps: the final values
                log_final_step(trainer, result)
            record_prompt_format(model.config, cfg.data, stage)
            export = cfg.get("export") or {}
            written = {
                "dtype": export_dtype(export.get("dtype", "auto"), cfg.trainer.get("precision")),
                "max_shard_size": export.get("max_shard_size", "5GB"),
            }
            if peft_model is None:
                export_stage(model, tokenizer, image_processor, paths["export"], **written)
            else:
                export_lora_stage(peft_model, cfg.lora, tokenizer, image_processor, paths, **written)
            result.update(counts, wall_time_s=time.perf_counter() - started, resumed=resume)
            (paths["stage_dir"] / "metrics.json").write_text(json.dumps(result, indent=2))
            # Summary numbers only: the per-step series (train/loss ...) were logged during training.
            run.log_metrics({k: v for k, v in result.items() if "/" not in k and _is_number(v)})
            log_export(run, paths["export"], cfg.logger)
            completed_marker.write_text(run.run_id or "")
    if run.unsent:
        log.warning(
            "stage %s is complete in %s (metrics.json, logs/metrics.csv, export/), but MLflow run %s "
            "misses what it could not take: %s",
            stage,
            paths["stage_dir"],
            run.run_id,
            "; ".join(run.unsent),
        )
    return result


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
    cfg: DictConfig, model, paths: dict[str, Path], run_id: str | None, extra_callbacks: list[L.Callback]
) -> L.Trainer:
    """The Trainer of ``cfg.trainer``, with ``cfg.callbacks`` and ``cfg.logger.loggers``, all instantiated
    from config. The stage supplies its schedule and folders, the run its MLflow run, and the model
    the strategy's wrap policy (:func:`build_strategy`)."""
    stage = cfg.stage
    strategy = build_strategy(cfg.trainer.get("strategy", "auto"), model)
    at_run_time = {
        "model_checkpoint": {
            "dirpath": str(paths["checkpoints"]),
            "every_n_train_steps": int(stage.checkpoint_every_n_steps),
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
        max_epochs=int(stage.epochs),
        max_steps=int(stage.max_steps),
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
