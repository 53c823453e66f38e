"""Run one MoE-Tuning stage from a composed config: the single implementation behind
``python -m moe_llava.train``, ``moe-llava train``, DVC and Prefect.

Outputs, under ``<run_dir>/<stage>/``:
  export/        the stage's weights (safetensors), tokenizer and image processor: the next stage's input
  checkpoints/   Lightning checkpoints for resuming this stage (``last.ckpt``)
  data/          prepared manifests, quarantine files and counts
  metrics.json   final losses, steps, wall time (DVC-trackable)
  logs/          Lightning's CSV log (metrics.csv: the loss curves `dvc plots` draws)
  COMPLETED      written last; a stage without it was interrupted and resumes on the next run
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_llava.data.config import stage_config, tokenizer_from_config
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.model.builder import build_image_processor
from moe_llava.tracking import TrackedRun, data_hash, git_commit, start_stage_run, tracking_uri
from moe_llava.training.callbacks import AtomicCheckpointIO, RouterStatsLogger
from moe_llava.training.datamodule import LlavaDataModule
from moe_llava.training.lit_module import MoELlavaLitModule
from moe_llava.training.stages import (
    configure_trainable,
    load_stage_model,
    previous_stage,
    split_moe_settings,
)
from moe_llava.training.strategies import build_strategy, is_checkpoint_io_compatible
from moe_llava.training.validation import accumulation_steps, validate_stage_config

COMPLETED = "COMPLETED"


def resolve_stage_config(cfg: DictConfig, command_line: Sequence[str] = ()) -> DictConfig:
    """Merge the experiment's ``stage_overrides[<stage>]`` into ``stage`` and resolve interpolations.

    ``command_line``: the Hydra overrides the user typed; an explicit ``stage.<key>=...`` there
    wins over the preset's value for that key.
    """
    cfg = cfg.copy()
    preset = (cfg.get("stage_overrides") or {}).get(cfg.stage.name)
    if preset:
        explicit = {
            o.lstrip("+").split("=", 1)[0].removeprefix("stage.")
            for o in command_line
            if o.lstrip("+").startswith("stage.")
        }
        cfg.stage = OmegaConf.merge(cfg.stage, {k: v for k, v in preset.items() if k not in explicit})
    OmegaConf.resolve(cfg)
    return cfg


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


def _load_model_and_processors(cfg: DictConfig, init_dir: Path | None):
    moe_settings, coefficients = split_moe_settings(OmegaConf.to_container(cfg.moe))
    if init_dir is None:  # stage 1 (or a later stage without a previous export): the recipe
        default_tokenizer = cfg.model.language_model.get("name_or_path")
        tokenizer = tokenizer_from_config(cfg.data, default=default_tokenizer)
        image_processor = build_image_processor(cfg.model.vision_tower, pretrained=cfg.model.pretrained)
    else:
        from transformers import AutoImageProcessor

        tokenizer = load_tokenizer(init_dir)
        image_processor = AutoImageProcessor.from_pretrained(str(init_dir))
    model, origin = load_stage_model(
        cfg.stage.name,
        init_dir,
        lambda: instantiate(cfg.model, tokenizer=tokenizer),
        upcycle=bool(cfg.stage.upcycle),
        moe_settings=moe_settings,
    )
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


def export_stage(model, tokenizer, image_processor, export_dir: Path) -> None:
    """save_pretrained everything the next stage needs, atomically (a half-written export never looks done)."""
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    shutil.rmtree(export_dir, ignore_errors=True)
    tmp.rename(export_dir)


def run_stage(
    cfg: DictConfig, command_line: Sequence[str] = (), callbacks: list[L.Callback] | None = None
) -> dict[str, Any]:
    """Train ``cfg.stage`` and export it.

    ``command_line``: the overrides ``cfg`` was composed with (see :func:`resolve_stage_config`);
    ``callbacks`` are added to the Trainer's (programmatic use).
    """
    cfg = resolve_stage_config(cfg, command_line)
    validate_stage_config(OmegaConf.to_container(cfg))
    L.seed_everything(int(cfg.seed), workers=True)
    stage = cfg.stage.name
    paths = stage_paths(cfg)
    started = time.perf_counter()

    completed_marker = paths["stage_dir"] / COMPLETED
    last_ckpt = paths["checkpoints"] / "last.ckpt"
    resume = cfg.resume == "auto" and last_ckpt.is_file() and not completed_marker.exists()
    if not resume and rank_zero_only.rank == 0:  # a fresh attempt: stale checkpoints must not leak in
        shutil.rmtree(paths["checkpoints"], ignore_errors=True)
        completed_marker.unlink(missing_ok=True)

    model, tokenizer, image_processor, origin = _load_model_and_processors(cfg, paths["init"])
    configure_trainable(model, cfg.stage.trainable, cfg.get("train_modules"))
    if cfg.stage.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns, and goes in v6); older 5.x only has the old one.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()

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
            "git_commit": git_commit(),
            "data_hash": data_version,
            "model_origin": origin,
            "moe": json.dumps(model.config.moe) if model.is_moe else "dense",
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
        counts = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        run.log_metrics(counts)
        result = _fit(cfg, model, tokenizer, image_processor, paths, run, resume, callbacks or [])
        if rank_zero_only.rank == 0:
            record_prompt_format(model.config, cfg.data, stage)
            export_stage(model, tokenizer, image_processor, paths["export"])
            result.update(counts, wall_time_s=time.perf_counter() - started, resumed=resume)
            (paths["stage_dir"] / "metrics.json").write_text(json.dumps(result, indent=2))
            # Summary numbers only: the per-step series (train/loss ...) were logged during training.
            run.log_metrics({k: v for k, v in result.items() if "/" not in k and _is_number(v)})
            if cfg.logger.get("log_model_weights", True):
                run.log_artifacts(paths["export"], "export")
            completed_marker.write_text(run.run_id or "")
    return result


def _fit(
    cfg, model, tokenizer, image_processor, paths, run: TrackedRun, resume: bool, extra_callbacks
) -> dict[str, Any]:
    stage_cfg, trainer_cfg = cfg.stage, cfg.trainer
    strategy = build_strategy(trainer_cfg.get("strategy", "auto"), model)
    checkpoint = ModelCheckpoint(
        dirpath=str(paths["checkpoints"]),
        filename="step{step}",
        every_n_train_steps=int(stage_cfg.checkpoint_every_n_steps),
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    logger = MLFlowLogger(
        experiment_name=cfg.experiment_name,
        tracking_uri=tracking_uri(
            cfg.logger
        ),  # every rank: the logger builds a client even where it logs nothing
        run_id=run.run_id,
    )
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step")]
    if trainer_cfg.enable_progress_bar and not sys.stderr.isatty():
        # Rich's bar (Lightning's default) draws nothing until the end without a terminal; tqdm's
        # lines reach logs (Prefect, DVC, SLURM) as training goes.
        callbacks.append(TQDMProgressBar(refresh_rate=int(trainer_cfg.log_every_n_steps)))
    callbacks.append(RouterStatsLogger(cfg.logger.get("router_stats_every_n_steps", 10)))
    callbacks.extend(extra_callbacks)
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.get("num_nodes", 1),
        strategy=strategy,
        precision=trainer_cfg.precision,
        max_epochs=int(stage_cfg.epochs),
        max_steps=int(stage_cfg.get("max_steps", -1)),
        gradient_clip_val=stage_cfg.max_grad_norm or None,
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        val_check_interval=stage_cfg.get("val_every_n_steps"),
        enable_progress_bar=bool(trainer_cfg.enable_progress_bar),
        deterministic=bool(trainer_cfg.get("deterministic", False)),
        # MLflow for people; the CSV (<stage>/logs/metrics.csv) for `dvc plots` and the flow's summary.
        logger=[logger, CSVLogger(save_dir=str(paths["stage_dir"]), name="", version="logs")],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()] if is_checkpoint_io_compatible(strategy) else None,
        use_distributed_sampler=False,  # the modality-grouped batch sampler shards by rank itself
        default_root_dir=str(paths["stage_dir"]),
        num_sanity_val_steps=0,
    )
    trainer.accumulate_grad_batches = accumulation_steps(stage_cfg, trainer.world_size)
    datamodule = LlavaDataModule(
        cfg.data,
        cfg.stage.name,
        paths["data"],
        tokenizer=tokenizer,
        image_processor=image_processor,
        num_image_tokens=model.num_image_tokens,
        micro_batch_size=int(stage_cfg.micro_batch_size),
        num_workers=int(trainer_cfg.get("num_workers", 0)),
        seed=int(cfg.seed),
    )
    module = MoELlavaLitModule(
        model,
        lr=float(stage_cfg.lr),
        weight_decay=float(stage_cfg.weight_decay),
        warmup_ratio=float(stage_cfg.warmup_ratio),
        lr_scale={str(k): float(v) for k, v in (stage_cfg.get("lr_scale") or {}).items()},
    )
    model.train()  # `from_pretrained` returns eval mode, and Lightning keeps the modes it finds
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=str(paths["checkpoints"] / "last.ckpt") if resume else None,
        weights_only=True,
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {"global_step": trainer.global_step, "epochs": trainer.current_epoch, **metrics}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
