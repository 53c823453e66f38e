"""One LightningModule for all three stages: the stage decides what is trainable, not the code."""

from __future__ import annotations

import math

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from moe_llava.model import MoELlavaForCausalLM
from moe_llava.training.callbacks import StepThroughput

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_mask")


class MoELlavaLitModule(L.LightningModule):
    """Trains the parameters of ``model`` that require grad with AdamW and a warmup + cosine schedule.

    ``lr_scale`` multiplies the learning rate of whole parts (``vision_tower``, ``projector``,
    ``language_model``), like LLaVA-NeXT's separate vision-tower and projector learning rates.
    """

    def __init__(
        self,
        model: MoELlavaForCausalLM,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_scale: dict[str, float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.lr_scale = dict(lr_scale or {})
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.betas = tuple(betas)

    def forward(self, batch: dict):
        return self.model(**{key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None})

    def _log_losses(self, out, split: str, batch_size: int) -> None:
        # Training: per step on this rank; validation: epoch means synchronised across ranks.
        on_step = split == "train"
        parts = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, "z_loss": out.z_loss}
        for name, value in parts.items():
            if value is None:
                continue
            self.log(
                f"{split}/{name}",
                value,
                prog_bar=name == "loss",
                batch_size=batch_size,
                on_step=on_step,
                on_epoch=not on_step,
                sync_dist=not on_step,
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self._log_losses(out, "train", batch["input_ids"].shape[0])
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        self._log_losses(out, "val", batch["input_ids"].shape[0])

    def configure_callbacks(self) -> list[L.Callback]:
        return [StepThroughput()]  # train/tokens_per_sec and train/samples_per_sec of every stage

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            param_groups(self.model, self.lr, self.lr_scale),
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup_steps = math.ceil(total_steps * self.warmup_ratio)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def param_groups(model: torch.nn.Module, lr: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by learning rate: ``lr`` times the scale of their top-level part."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = float((lr_scale or {}).get(name.split(".", 1)[0], 1.0))
            groups.setdefault(lr * scale, []).append(param)
    return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]
