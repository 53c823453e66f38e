"""Data-pipeline benchmark: how fast the training DataLoader makes stage-2 batches, against how fast
the tiny_cpu model's training step consumes them.

The real Hydra config (``experiment=tiny_cpu stage=stage2``) is composed, and everything is built
from it as ``run_stage`` builds it: the ShapesWorld tokenizer, the tiny vision tower's image
processor, the stage-2 :class:`~moe_llava.data.dataset.LlavaDataset` (image decode, pad-to-square,
image processing, tokenisation with the ``phi`` template) and
:func:`~moe_llava.data.loader.build_dataloader` (modality/length-grouped batches, collation) at
the preset's micro batch size and the trainer config's ``num_workers``. Interleaved variants:

==============  ==================================================================================
``loader``      the next batch from the loader (a persistent iterator; a new epoch when it ends)
``train_step``  one tiny_cpu stage-2 training step (forward, backward, clipping, AdamW) on one of
                a few batches taken from the same loader beforehand, the preset's trainable set
==============  ==================================================================================

Both handle a full micro batch per call (``drop_last``), so headroom = T_step / T_loader (paired
per round) = (loader samples/s) / (step samples/s). Target: >= 3.

With ``num_workers = 0`` (the CPU trainer's default) loading and stepping run one after the other in
training, so an iteration takes T_loader + T_step; ``loader_share`` is T_loader's part of it. With
workers the loader prefetches in other processes, which then compete with the timed step here:
the numbers describe the default only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from bench import common, models, world
from bench.timing import paired_ratio, summarize

NAME = "data"
TARGET_TEXT = "DataLoader samples/s >= 3 x the samples/s a tiny_cpu stage-2 training step consumes"


@dataclass
class DataBenchConfig:
    data_root: str | None = None  # None: data/shapesworld when present, else a generated small world
    generate_world: bool = False  # always use a generated small ShapesWorld (quick)
    batch_size: int | None = None  # None: the preset's stage-2 micro batch size
    num_workers: int | None = None  # None: the trainer config's num_workers
    step_batches: int = 4  # distinct batches the train_step variant cycles through
    hydra_overrides: tuple[str, ...] = ()  # extra Hydra overrides (e.g. a smaller model in tests)
    repeats: int = 9
    warmup: int = 2
    seed: int = 0
    headroom_target: float = 3.0
    max_waiting_cores: float | None = 0.15
    max_rounds_factor: int = 3
    max_quiet_wait_s: float = 30.0


FULL = DataBenchConfig()
QUICK = DataBenchConfig(
    generate_world=True, step_batches=2, repeats=3, warmup=1, max_rounds_factor=2, max_quiet_wait_s=5.0
)


def config_from_options(quick: bool = False, **overrides) -> DataBenchConfig:
    return common.replace_config(QUICK if quick else FULL, NAME, overrides)


def compose(overrides: list[str]):
    """The project's root Hydra config composed with ``overrides`` (as ``python -m moe_llava.train``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from moe_llava.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


class Batches:
    """Endless batches from a loader: a new epoch (``set_epoch``) whenever one ends."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.iterator = iter(loader)

    def __next__(self) -> dict:
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "batch_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            return next(self.iterator)


def run(cfg: DataBenchConfig, log=print) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moe_llava.data.config import dataset_from_config, tokenizer_from_config
    from moe_llava.data.loader import build_dataloader
    from moe_llava.model.builder import build_image_processor
    from moe_llava.training.run import resolve_stage_config

    start = time.perf_counter()
    root, source = world.resolve(cfg.data_root, cfg.generate_world)
    # Random weights (no backbone step needed): a training step costs the same with any values.
    overrides = [
        "experiment=tiny_cpu",
        "stage=stage2",
        "model.pretrained=false",
        f"data.root={root}",
        *cfg.hydra_overrides,
    ]
    hcfg = resolve_stage_config(compose(overrides), overrides)
    tokenizer = tokenizer_from_config(hcfg.data)
    image_processor = build_image_processor(hcfg.model.vision_tower, pretrained=bool(hcfg.model.pretrained))
    torch.manual_seed(cfg.seed)
    model = instantiate(hcfg.model, tokenizer=tokenizer)
    dataset = dataset_from_config(
        hcfg.data,
        "stage2",
        tokenizer=tokenizer,
        image_processor=image_processor,
        num_image_tokens=model.num_image_tokens,
        split="train",
    )
    stage = OmegaConf.to_container(hcfg.stage, resolve=True)
    batch_size = int(cfg.batch_size or stage["micro_batch_size"])
    workers = int(cfg.num_workers if cfg.num_workers is not None else hcfg.trainer.get("num_workers", 0))
    if len(dataset) < batch_size:
        raise ValueError(
            f"the stage-2 dataset has {len(dataset)} records, fewer than one batch of {batch_size}"
        )

    def loader():
        return build_dataloader(
            dataset, batch_size, shuffle=True, seed=int(hcfg.seed), num_workers=workers, drop_last=True
        )

    batches = Batches(loader())
    pool_source = Batches(loader())
    pool = [next(pool_source) for _ in range(cfg.step_batches)]
    del pool_source  # with workers: let them go before the timing starts
    patterns = hcfg.get("train_modules")
    step = models.TrainStep.for_stage(
        model.train(), stage, precision=hcfg.trainer.precision, patterns=list(patterns) if patterns else None
    )
    cursor = {"i": 0}

    def train_step():
        batch = pool[cursor["i"] % len(pool)]
        cursor["i"] += 1
        step(batch)

    checks = [_batch_contract(pool[0], batch_size, model.num_image_tokens)]
    timing, info = common.timed_case({"loader": lambda: next(batches), "train_step": train_step}, cfg)
    samples = timing.samples
    loss = float(step.last_loss)
    checks.append(
        common.check(
            "train_step_loss_finite",
            "stage2",
            "the tiny_cpu stage-2 training step on loader batches gives a finite loss",
            math.isfinite(loss),
            loss=loss,
        )
    )
    headroom = paired_ratio(samples["train_step"], samples["loader"])
    share = [lo / (lo + st) for lo, st in zip(samples["loader"], samples["train_step"])]
    tokens = [int(b["attention_mask"].sum()) for b in pool]
    row = {
        "case": f"stage2 b{batch_size} w{workers}",
        "batch_size": batch_size,
        "num_workers": workers,
        "times_ms": timing.stats_ms(),
        "samples_per_s": {
            "loader": summarize([batch_size / t for t in samples["loader"]]),
            "train_step": summarize([batch_size / t for t in samples["train_step"]]),
        },
        "headroom": headroom,
        "loader_share_of_iteration": summarize(share),
        "step_batch_tokens": tokens,
        "epochs_started": batches.epoch + 1,
        **info,
    }
    log(
        f"[{NAME}] {row['case']}: loader {row['samples_per_s']['loader']['median']:.0f} samples/s, "
        f"step {row['samples_per_s']['train_step']['median']:.0f} samples/s, "
        f"headroom {common.fmt(headroom['median'], '.2f')}x  rounds {common.rounds_text(row)}"
        + ("  CONTENDED" if row["rounds"]["contended"] else "")
    )
    result = {
        "suite": NAME,
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dataclasses.asdict(cfg),
        "environment": common.environment(torch.device("cpu"), load=info["load"]),
        "data": {
            "source": source,
            "root": str(root),
            "manifest": str(hcfg.data.stages.stage2.train),
            "records": len(dataset),
            "template": str(hcfg.data.stages.stage2.template),
            "image_aspect": str(hcfg.data.stages.stage2.image_aspect),
            "trainable": stage["trainable"],
            "precision": str(hcfg.trainer.precision),
        },
        "checks": checks,
        "results": [row],
        "targets": [
            common.verdict("loader_headroom", row["case"], headroom, ">=", cfg.headroom_target, TARGET_TEXT)
        ],
    }
    return common.finish(result, start)


def _batch_contract(batch: dict, batch_size: int, num_image_tokens: int) -> dict:
    """The collated batch is what the model expects: shapes agree, image tokens match the images."""
    ids = batch["input_ids"]
    pixel_values = batch.get("pixel_values")
    images = 0 if pixel_values is None else int(pixel_values.shape[0])
    same_shape = all(batch[k].shape == ids.shape for k in ("attention_mask", "labels", "image_mask"))
    image_tokens = int(batch["image_mask"].sum())
    return common.check(
        "batch_contract",
        "stage2",
        "a loader batch: batch size, equal shapes of ids/mask/labels/image_mask, "
        "image tokens = images x num_image_tokens, some supervised labels",
        ids.shape[0] == batch_size
        and same_shape
        and image_tokens == images * num_image_tokens
        and bool((batch["labels"] != -100).any()),
        shape=list(ids.shape),
        images=images,
        image_tokens=image_tokens,
    )


def format_table(result: dict) -> str:
    lines = common.header_lines(
        "Data-pipeline benchmark (stage-2 DataLoader vs tiny_cpu training step)", result
    )
    data = result["data"]
    lines.append(
        f"data: {data['source']}; {data['records']} stage-2 records, template {data['template']}, "
        f"image_aspect {data['image_aspect']}; step: trainable {data['trainable']}, precision {data['precision']}"
    )
    lines.append("")
    header = (
        f"{'case':16s} {'loader ms':>9s} {'step ms':>9s} {'loader samples/s':>16s} {'step samples/s':>14s} "
        f"{'headroom':>8s} {'loader share':>12s} {'rounds':>7s}"
    )
    lines += [header, "-" * len(header)]
    for row in result["results"]:
        t, sps = row["times_ms"], row["samples_per_s"]
        lines.append(
            f"{row['case']:16s} {t['loader']['median']:9.1f} {t['train_step']['median']:9.1f} "
            f"{sps['loader']['median']:16.1f} {sps['train_step']['median']:14.1f} "
            f"{common.fmt(row['headroom']['median'], '.2f'):>7s}x "
            f"{common.fmt(row['loader_share_of_iteration']['median'], '.1%'):>12s} {common.rounds_text(row):>7s}"
        )
    lines += ["", *common.checks_lines(result["checks"]), "", *common.verdict_lines(result["targets"])]
    return "\n".join(lines)
