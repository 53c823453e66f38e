"""One LightningDataModule for all stages: a stage's prepared (validated) manifests as batches."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from moe_llava.data.config import dataset_from_config, prepare_stage, stage_manifest, validator_from_config
from moe_llava.data.loader import build_dataloader
from moe_llava.errors import ConfigError

SPLITS = ("train", "val")


def prepare_splits(data_cfg: Any, stage: str, out_dir: str | Path, *, tokenizer: Any, num_image_tokens: int):
    """Validate the stage's splits into ``out_dir/<split>`` (:func:`prepare_stage`); a split whose
    source file and validation settings are unchanged since its last preparation is skipped.

    Raises :class:`~moe_llava.errors.RejectedFractionError` (naming the quarantine file) when a
    split rejects more than ``data.validation.max_rejected_fraction``.
    """
    out_dir = Path(out_dir)
    for split in SPLITS:
        manifest = stage_manifest(data_cfg, stage, split)
        if not manifest:
            continue
        source = Path(manifest)
        if not source.is_file():
            raise ConfigError(f"data.stages.{stage}.{split}", f"manifest {source} does not exist")
        split_dir = out_dir / split
        validator = validator_from_config(
            data_cfg, stage, tokenizer=tokenizer, num_image_tokens=num_image_tokens
        )
        stamp = {
            "source": str(source.resolve()),
            "size": source.stat().st_size,
            "mtime_ns": source.stat().st_mtime_ns,
            # a changed policy, length or tokenizer prepares again
            "settings": validator.settings(),
            "max_rejected_fraction": (data_cfg.get("validation") or {}).get("max_rejected_fraction"),
        }
        stamp_file = split_dir / "source.json"
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            continue
        result = prepare_stage(
            data_cfg,
            stage,
            split_dir,
            tokenizer=tokenizer,
            num_image_tokens=num_image_tokens,
            split=split,
            progress=True,
        )
        print(f"[{stage}/{split}] {result.summary()}")
        stamp_file.write_text(json.dumps(stamp))


class LlavaDataModule(L.LightningDataModule):
    """Prepares (validates, quarantines) the stage's manifests once, then serves them.

    Args:
        data_cfg: the ``data`` config node.
        stage: ``stage1`` / ``stage2`` / ``stage3``.
        out_dir: where the prepared manifests, quarantine files and counts go.
        tokenizer, image_processor, num_image_tokens: from the model being trained.
    """

    def __init__(
        self,
        data_cfg: Any,
        stage: str,
        out_dir: str | Path,
        *,
        tokenizer: Any,
        image_processor: Any,
        num_image_tokens: int,
        micro_batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.data_cfg = data_cfg
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, Any] = {}
        self.prepared: dict[str, dict] = {}
        self._resume_at: dict[str, int] | None = None
        self._train_loader_built = False

    def _splits(self) -> list[str]:
        return [split for split in SPLITS if stage_manifest(self.data_cfg, self.stage, split)]

    def prepare_data(self) -> None:
        """Rank 0 only: validate each split into ``out_dir/<split>`` unless done already (the stage
        prepares its data before the model loads; this finds it done)."""
        prepare_splits(
            self.data_cfg,
            self.stage,
            self.out_dir,
            tokenizer=self.tokenizer,
            num_image_tokens=self.num_image_tokens,
        )

    def prepared_manifest(self, split: str) -> Path:
        found = sorted((self.out_dir / split).glob("manifest.json*"))
        if not found:
            raise FileNotFoundError(
                f"no prepared {split} manifest in {self.out_dir / split}: run prepare_data first"
            )
        return found[0]

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits():
            if split not in self.datasets:
                self.datasets[split] = dataset_from_config(
                    self.data_cfg,
                    self.stage,
                    tokenizer=self.tokenizer,
                    image_processor=self.image_processor,
                    num_image_tokens=self.num_image_tokens,
                    split=split,
                    manifest=self.prepared_manifest(split),
                )

    def _loader(self, split: str, shuffle: bool):
        trainer = self.trainer
        return build_dataloader(
            self.datasets[split],
            self.micro_batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            return_ids=True,  # a batch names its records (what was trained on, which record broke a step)
        )

    def train_dataloader(self):
        loader = self._loader("train", shuffle=True)
        self._train_loader_built = True
        if self._resume_at is not None:
            loader.batch_sampler.resume(self._resume_at["epoch"], self._resume_at["batches_done"])
            self._resume_at = None
        return loader

    # Mid-epoch resume. Lightning restores its loop counters from a checkpoint but replays the
    # epoch's batches from the start; the checkpoint also carries this state (where the training
    # epoch stood), and the resumed stage trains the rest of the epoch, each sample once.
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        # batches of this epoch whose step ran (the counter Lightning itself resumes its loop from)
        epoch, done = trainer.current_epoch, int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:  # saved at the epoch's end: Lightning goes on with the next
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        if state["seed"] != self.seed:
            raise ConfigError(
                "seed",
                f"the checkpoint's epoch order was drawn with seed {state['seed']}, this run has seed "
                f"{self.seed}: resume with the same seed, or start the stage over (resume=never)",
            )
        if self._train_loader_built:  # FSDP and DeepSpeed restore after setup, which built the loader
            warnings.warn(
                "the strategy restores checkpoints after the training data loader started: "
                "the interrupted epoch is replayed from its start",
                stacklevel=2,
            )
            return
        self._resume_at = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
        # Lightning cannot see that this loader resumes (its loader is not the stateful object).
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
        )

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if "val" in self.datasets else []
