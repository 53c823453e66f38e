"""One LightningDataModule for all stages: a stage's prepared (validated) manifests as batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from moe_llava.data.config import dataset_from_config, prepare_stage, stage_manifest
from moe_llava.data.loader import build_dataloader

SPLITS = ("train", "val")


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

    def _splits(self) -> list[str]:
        return [split for split in SPLITS if stage_manifest(self.data_cfg, self.stage, split)]

    def prepare_data(self) -> None:
        """Rank 0 only: validate each split into ``out_dir/<split>`` unless its source is unchanged."""
        for split in self._splits():
            source = Path(stage_manifest(self.data_cfg, self.stage, split))
            if not source.is_file():
                raise ValueError(f"data.stages.{self.stage}.{split}: manifest {source} does not exist")
            split_dir = self.out_dir / split
            stamp = {
                "source": str(source.resolve()),
                "size": source.stat().st_size,
                "mtime_ns": source.stat().st_mtime_ns,
            }
            stamp_file = split_dir / "source.json"
            if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
                continue
            result = prepare_stage(
                self.data_cfg,
                self.stage,
                split_dir,
                tokenizer=self.tokenizer,
                num_image_tokens=self.num_image_tokens,
                split=split,
                progress=True,
            )
            print(f"[{self.stage}/{split}] {result.summary()}")
            stamp_file.write_text(json.dumps(stamp))

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
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if "val" in self.datasets else []
