"""Lightning callbacks and plugins of a training stage."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moe_llava.atomic import write_file
from moe_llava.model import RouterStats, moe_blocks


def router_metrics(stats_by_layer: dict[str, RouterStats]) -> dict[str, float]:
    """Flat per-MoE-layer metrics: top-1 load per expert (all / image / text tokens), drop rate, entropy."""
    metrics: dict[str, float] = {}
    for name, stats in stats_by_layer.items():
        if stats is None:
            continue
        match = re.search(r"layers\.(\d+)", name)
        prefix = f"moe/layer{match.group(1)}" if match else f"moe/{name}"
        total = max(int(stats.num_tokens), 1)
        for e, count in enumerate(stats.top1.tolist()):
            metrics[f"{prefix}/expert{e}_load"] = count / total
        for split, counts in (("image", stats.image_top1), ("text", stats.text_top1)):
            if counts is not None and int(counts.sum()) > 0:
                n = int(counts.sum())
                for e, count in enumerate(counts.tolist()):
                    metrics[f"{prefix}/{split}_expert{e}_load"] = count / n
        metrics[f"{prefix}/drop_rate"] = stats.drop_fraction
        metrics[f"{prefix}/entropy"] = float(stats.entropy)
    return metrics


class RouterStatsLogger(L.Callback):
    """Logs the MoE layers' routing statistics of the latest training batch every ``every_n_steps``."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, int(every_n_steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        blocks = moe_blocks(pl_module.model.language_model)
        if not blocks:
            return
        metrics = router_metrics({name: block.last_stats for name, block in blocks})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


class StepThroughput(L.Callback):
    """``train/tokens_per_sec`` (progress bar) and ``train/samples_per_sec`` of this rank: Lightning's
    :class:`~lightning.fabric.utilities.throughput.Throughput` over the last ``window`` steps, timed from
    batch start to batch end (forward, backward, optimizer; not the wait for data).

    Lightning's ``ThroughputMonitor`` is not used as is: it logs other names (``train/device/items_per_sec``)
    straight to the loggers (no progress bar), times from one batch end to the next, needs a full window
    before its first rate, and logs validation throughput and counters too.
    """

    def __init__(self, window: int = 1) -> None:
        self.window = max(1, int(window))

    def on_train_start(self, trainer, pl_module) -> None:
        self._throughput = Throughput(window_size=self.window + 1)
        self._busy_s, self._batches, self._samples, self._tokens = 0.0, 0, 0, 0
        self._throughput.update(time=0.0, batches=0, samples=0, lengths=0)  # a rate from the first step
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is None:
            return
        self._busy_s += max(time.perf_counter() - self._started, 1e-9)
        self._batches += 1
        self._samples += int(batch["input_ids"].shape[0])
        self._tokens += int(batch["attention_mask"].sum())
        self._throughput.update(
            time=self._busy_s, batches=self._batches, samples=self._samples, lengths=self._tokens
        )
        rates = self._throughput.compute()
        if "device/items_per_sec" in rates:
            log = {"on_step": True, "batch_size": 1}
            pl_module.log("train/tokens_per_sec", rates["device/items_per_sec"], prog_bar=True, **log)
            pl_module.log("train/samples_per_sec", rates["device/samples_per_sec"], **log)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it (:func:`moe_llava.atomic.write_file`):
    a failed write (disk full, I/O error: :class:`~moe_llava.errors.WriteFailed`) or a kill mid-write
    never leaves a torn file and keeps the previous checkpoint of that name."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        for stale in path.parent.glob(".*.ckpt.tmp"):  # what a killed write left
            stale.unlink(missing_ok=True)
        save = super().save_checkpoint
        write_file(path, lambda tmp: save(checkpoint, tmp, storage_options), "checkpoint")


def log_progress_bar(enabled: bool, refresh_rate: int) -> TQDMProgressBar | None:
    """tqdm's bar when the Trainer shows a bar and stderr is no terminal (logs); None: Lightning's default."""
    return TQDMProgressBar(refresh_rate=int(refresh_rate)) if enabled and not sys.stderr.isatty() else None
