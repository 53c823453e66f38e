"""One LightningModule for pretraining any ``transformers`` model on its own loss."""

from __future__ import annotations

import math

import lightning as L
import torch
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup


class PretrainModule(L.LightningModule):
    """``model(**batch).loss`` with AdamW and a warmup + cosine schedule."""

    def __init__(
        self, model: PreTrainedModel, lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.05
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=next(iter(batch.values())).shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=next(iter(batch.values())).shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total * self.warmup_ratio), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
