"""Test-only Lightning callbacks, added to a stage from the command line as any callback is
(``+callbacks.<name>={_target_: tests.training.faults.<Class>, ...}``): a record of the batches
trained on, and a node failure (SIGKILL) at a chosen step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L


class BatchLog(L.Callback):
    """Appends one JSON line per trained batch: process, epoch, batch index, global step, record ids."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        line = {"pid": os.getpid(), "epoch": trainer.current_epoch, "batch_idx": batch_idx}
        line["step"] = trainer.global_step
        with self.path.open("a") as f:
            f.write(json.dumps({**line, "ids": list(batch["ids"])}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAt(L.Callback):
    """SIGKILLs its own process once the optimizer reaches ``step`` (before that step's checkpoint
    is written), once per ``marker`` file: the retry that follows runs to the end."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = int(step), Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def attempts(path: Path) -> list[list[dict]]:
    """The logged batches, per process that trained (in order)."""
    by_pid: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        batch = json.loads(line)
        by_pid.setdefault(batch["pid"], []).append(batch)
    return list(by_pid.values())


def trained_sequence(killed: list[dict], resumed: list[dict]) -> list[dict]:
    """The batches whose training survived: the killed attempt's up to where the resumed one
    continued (the rest were rolled back with the checkpoint), then the resumed attempt's."""
    start = (resumed[0]["epoch"], resumed[0]["batch_idx"])
    return [b for b in killed if (b["epoch"], b["batch_idx"]) < start] + resumed
