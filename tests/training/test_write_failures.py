"""Checkpoint and export writes that fail part-way (disk full, I/O error) or are killed: the previous
output stays byte-identical, the error names the path and the cause, and the next write cleans up."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from moe_llava import train
from moe_llava.config import resolved
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.errors import WriteFailed
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.model.builder import build_image_processor
from moe_llava.tracking import RUN_ID_FILE
from moe_llava.training import run_stage
from moe_llava.training.callbacks import AtomicCheckpointIO
from moe_llava.training.run import COMPLETED, export_stage
from tests.training.conftest import shrunk_overrides

REASONS = {errno.ENOSPC: "disk full", errno.EIO: "I/O error"}


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary and set-aside copies of outputs in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


@contextmanager
def write_fails(code: int):
    """The model's save_pretrained leaves its weights file half-written and fails with ``code`` as
    the OS reports it (ENOSPC: the disk filled up; EIO: the device failed)."""
    real = MoELlavaForCausalLM.save_pretrained

    def save_pretrained(self, folder, **kwargs):
        real(self, folder, **kwargs)
        weights = Path(folder) / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        raise OSError(code, os.strerror(code), str(weights))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MoELlavaForCausalLM, "save_pretrained", save_pretrained)
        yield


def export_parts(compose_stage, shapesworld, seed: int):
    cfg = resolved(compose_stage("stage2"))
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(shapesworld / "tokenizer")
    image_processor = build_image_processor(cfg.model.vision_tower, pretrained=False)
    return instantiate(cfg.model, tokenizer=tokenizer), tokenizer, image_processor


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["disk-full", "io-error"])
def test_a_failed_export_keeps_the_previous_one_and_names_path_and_cause(
    compose_stage, shapesworld, tmp_path, code
):
    export = tmp_path / "stage2" / "export"
    export_stage(*export_parts(compose_stage, shapesworld, seed=0), export)
    before = digests(export)
    newer = export_parts(compose_stage, shapesworld, seed=1)

    with write_fails(code), pytest.raises(WriteFailed) as failed:
        export_stage(*newer, export)
    message = str(failed.value)
    assert message.startswith(f"{export}: writing the stage export failed: {REASONS[code]}")
    assert os.strerror(code) in message and "unchanged" in message
    assert isinstance(failed.value.__cause__, OSError) and failed.value.__cause__.errno == code
    assert digests(export) == before
    assert leftovers(export.parent) == []  # the half-written folder is gone


def test_a_write_killed_mid_swap_is_undone_by_the_next_attempt(compose_stage, shapesworld, tmp_path):
    export = tmp_path / "stage2" / "export"
    export_stage(*export_parts(compose_stage, shapesworld, seed=0), export)
    before = digests(export)
    # What a process killed between moving the previous export aside and renaming the new one in
    # leaves: the previous export under its aside name, a half-written new one, no export.
    export.rename(export.with_name(".export.old"))
    half_written = export.with_name(".export.tmp")
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0" * 100)
    newer = export_parts(compose_stage, shapesworld, seed=1)

    with write_fails(errno.ENOSPC), pytest.raises(WriteFailed, match="disk full"):
        export_stage(*newer, export)  # the next attempt fails too: the previous export is back
    assert digests(export) == before and leftovers(export.parent) == []

    export_stage(*newer, export)  # a write that succeeds replaces it and leaves nothing beside it
    after = digests(export)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    assert leftovers(export.parent) == []


@contextmanager
def file_size_limit(limit: int):
    """The kernel refuses writes past ``limit`` bytes of any file (EFBIG) for this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_write_refused_part_way_by_the_kernel_keeps_the_previous_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    last = checkpoints / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.zeros(64 * 1024), "global_step": 1}, last)
    before = last.read_bytes()
    (checkpoints / ".step7.ckpt.tmp").write_bytes(b"torn")  # a killed write's leftover

    bigger = {"weights": torch.ones(256 * 1024), "global_step": 2}
    with file_size_limit(len(before)), pytest.raises(WriteFailed) as failed:
        io.save_checkpoint(bigger, last)
    assert str(failed.value).startswith(f"{last}: writing the checkpoint failed: file size limit reached")
    assert failed.value.__cause__.errno == errno.EFBIG
    assert last.read_bytes() == before and leftovers(checkpoints) == []

    io.save_checkpoint(bigger, last)
    assert io.load_checkpoint(last)["global_step"] == 2 and leftovers(checkpoints) == []


@pytest.mark.timeout(300)
def test_a_stage_whose_export_fails_is_not_completed_and_the_next_run_finishes_it(
    compose_stage, shapesworld, tmp_path, monkeypatch, capsys
):
    stage_dir = tmp_path / "artifacts" / "stage1"
    run_stage(compose_stage("stage1", "stage.max_steps=1"))
    before = digests(stage_dir / "export")

    # `python -m moe_llava.train`, in this process (leaving its logging alone): one line naming
    # the export and the cause.
    command = ["moe_llava.train", *shrunk_overrides(shapesworld, tmp_path), "stage=stage1"]
    no_logging_setup = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", [*command, "stage.max_steps=1", "seed=1", *no_logging_setup])
    with write_fails(errno.ENOSPC), pytest.raises(SystemExit) as exited:
        train.main()
    assert exited.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"moe-llava train: {stage_dir / 'export'}: writing the stage export failed: ")
    assert "disk full (No space left on device)" in last_line
    assert digests(stage_dir / "export") == before
    assert not (stage_dir / COMPLETED).exists() and leftovers(stage_dir) == []
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    failed_run = (stage_dir / RUN_ID_FILE).read_text()
    assert client.get_run(failed_run).info.status == "FAILED"

    # The next run resumes the trained step from its checkpoint and only writes the export again.
    result = run_stage(compose_stage("stage1", "stage.max_steps=1", "seed=1"))
    assert result["resumed"] is True and result["global_step"] == 1
    assert (stage_dir / COMPLETED).read_text() == failed_run
    assert client.get_run(failed_run).info.status == "FINISHED"
    assert digests(stage_dir / "export")["model.safetensors"] != before["model.safetensors"]
