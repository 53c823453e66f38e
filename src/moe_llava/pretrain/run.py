"""The backbone step: pretrain the recipe's vision tower and LM, save them for ``from_pretrained``.

Outputs, under ``backbones.out_dir`` (``<run_dir>/backbones``):
  vision/        the vision tower (``CLIPVisionModel``) and its image processor
  language/      the causal LM and the tokenizer it was trained with
  metrics.json   final losses, validation presence F1 of the vision tower, wall times
  logs/          Lightning's CSV logs (``vision/metrics.csv``, ``language/metrics.csv``)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from moe_llava.atomic import write_dir
from moe_llava.data.config import tokenizer_from_config
from moe_llava.errors import ConfigError
from moe_llava.model.builder import build_language_model
from moe_llava.pretrain import language, vision
from moe_llava.pretrain.lit import PretrainModule
from moe_llava.tracking import (
    TrackedRun,
    bound_http_retries,
    provenance_tags,
    start_stage_run,
    tracking_uri,
)
from moe_llava.training.loggers import BufferedMLFlowLogger


def _trainer(cfg: DictConfig, part: str, settings: DictConfig, out_dir: Path, run: TrackedRun) -> L.Trainer:
    trainer_cfg = cfg.trainer
    csv = CSVLogger(save_dir=str(out_dir / "logs"), name="", version=part)
    loggers: list = [csv]
    if run.active:
        loggers.append(
            BufferedMLFlowLogger(
                experiment_name=cfg.experiment_name,
                tracking_uri=tracking_uri(cfg.logger),
                run_id=run.run_id,
                local_copy=str(Path(csv.log_dir) / "metrics.csv"),
            )
        )
    callbacks = []
    if (
        trainer_cfg.enable_progress_bar and not sys.stderr.isatty()
    ):  # lines that reach logs (see training.run)
        callbacks.append(TQDMProgressBar(refresh_rate=int(trainer_cfg.log_every_n_steps)))
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=1,  # minutes of work on a tiny model: one device
        precision=trainer_cfg.precision,
        max_epochs=int(settings.epochs),
        max_steps=int(settings.get("max_steps", -1)),
        gradient_clip_val=1.0,
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        enable_progress_bar=bool(trainer_cfg.enable_progress_bar),
        enable_checkpointing=False,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
        num_sanity_val_steps=0,
    )


def _scalars(trainer: L.Trainer, part: str) -> dict[str, float]:
    return {f"{part}/{k}": float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def pretrain_vision(cfg: DictConfig, out_dir: Path, run: TrackedRun) -> dict[str, Any]:
    settings, root = cfg.backbones.vision, Path(cfg.data.root)
    started = time.perf_counter()
    data = vision.VisionData(
        cfg.model.vision_tower, root, Path(cfg.data.image_folder), settings.train, settings.get("val")
    )
    model = vision.recognizer_for(
        cfg.model.vision_tower, data.labels, int(cfg.model.get("vision_feature_layer", -2))
    )
    module = PretrainModule(
        model, float(settings.lr), float(settings.weight_decay), float(settings.warmup_ratio)
    )
    seed, batch = int(cfg.seed), int(settings.batch_size)
    val = data.loader("val", 256, False, seed) if data.val is not None else None
    trainer = _trainer(cfg, "vision", settings, out_dir, run)
    trainer.fit(module, data.loader("train", batch, True, seed), val)
    metrics = {
        "vision/train_images": len(data.train),
        "vision/labels": len(data.labels),
        **_scalars(trainer, "vision"),
    }
    if val is not None:
        trainer.validate(module, val, verbose=False)  # also when max_steps ended training mid-epoch
        metrics.update(_scalars(trainer, "vision"))
        metrics.update({f"vision/{k}": v for k, v in vision.presence_f1(model, val).items()})
    image_processor = data.transform.image_processor
    write_dir(out_dir / "vision", lambda tmp: vision.save_tower(model, image_processor, tmp), "vision tower")
    metrics["vision/wall_time_s"] = time.perf_counter() - started
    return metrics


def pretrain_language(cfg: DictConfig, out_dir: Path, run: TrackedRun) -> dict[str, Any]:
    settings, root = cfg.backbones.language, Path(cfg.data.root)
    started = time.perf_counter()
    tokenizer = tokenizer_from_config(cfg.data)
    if tokenizer is None:
        raise ConfigError(
            "backbones.language", "needs data.tokenizer (the tokenizer the LM is pretrained with)"
        )
    max_length = int(cfg.data.max_length)

    def samples(files) -> list:
        return [
            s
            for name in files or []
            for s in language.text_samples(root / name, settings.template, tokenizer, max_length)
        ]

    # The recipe's LM from its config values, sized to the tokenizer (as stage 1 builds one).
    model = build_language_model(
        {**dict(cfg.model.language_model), "name_or_path": None}, pretrained=False, tokenizer=tokenizer
    )
    module = PretrainModule(
        model, float(settings.lr), float(settings.weight_decay), float(settings.warmup_ratio)
    )
    seed, batch, pad = int(cfg.seed), int(settings.batch_size), int(tokenizer.pad_token_id)
    train = samples(settings.train)
    val = samples(settings.get("val"))
    val_loader = language.loader(val, pad, 64, False, seed) if val else None
    trainer = _trainer(cfg, "language", settings, out_dir, run)
    trainer.fit(module, language.loader(train, pad, batch, True, seed), val_loader)
    metrics = {"language/train_samples": len(train), **_scalars(trainer, "language")}
    if val_loader is not None:
        trainer.validate(module, val_loader, verbose=False)  # also when max_steps ended training mid-epoch
        metrics.update(_scalars(trainer, "language"))

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir(out_dir / "language", save, "language model")
    metrics["language/wall_time_s"] = time.perf_counter() - started
    return metrics


def run_backbones(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain ``cfg.backbones``' parts (vision, language) and save them under ``backbones.out_dir``."""
    if not cfg.get("backbones"):  # a recipe of released checkpoints: nothing to pretrain
        out_dir = Path(cfg.run_dir) / "backbones"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({"pretrained": False}, indent=2))
        print("backbones: null: the model recipe's own weights are used; nothing to pretrain")
        return {}
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    out_dir = Path(cfg.backbones.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bound_http_retries(cfg.logger.get("http"))
    run = start_stage_run(
        stage_dir=out_dir,
        stage="backbones",
        experiment_name=cfg.experiment_name,
        logger_cfg=cfg.logger,
        resume=False,
        parent_run_id=cfg.get("parent_run_id"),
        tags={"stage": "backbones", **provenance_tags()},
    )
    with run:  # FINISHED, or KILLED / FAILED with the error
        run.log_config(OmegaConf.to_container(cfg.backbones), OmegaConf.to_yaml(cfg.backbones))
        metrics: dict[str, Any] = {}
        for part, pretrain in (("vision", pretrain_vision), ("language", pretrain_language)):
            if cfg.backbones.get(part):
                L.seed_everything(int(cfg.seed), workers=True)
                metrics.update(pretrain(cfg, out_dir, run))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.log_metrics(metrics)
    return metrics
