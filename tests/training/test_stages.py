"""Three stages end to end on the real config: exactly the intended parameters train, the rest stay bit-identical."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import lightning as L
import pytest
import torch

from moe_llava.errors import ConfigError
from moe_llava.model import MoELlavaForCausalLM, SparseMoeBlock
from moe_llava.training import run_stage
from moe_llava.training.stages import configure_trainable
from tests.training.conftest import shrunk_overrides


class ParameterChangeRecorder(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.trainable = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        after = dict(pl_module.model.named_parameters())
        self.changed = {n for n, before in self.before.items() if not torch.equal(before, after[n].detach())}


def _groups(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.timeout(600)
def test_three_stages_train_exactly_their_parameters(compose_stage, tmp_path):
    recorders = {}
    paper_sets = {  # the paper's trainable sets (the tiny preset also trains the vision tower early)
        "stage1": "[projector]",
        "stage2": "[projector,language_model]",
        "stage3": "[projector,ffn]",
    }
    for stage, groups in paper_sets.items():
        recorders[stage] = ParameterChangeRecorder()
        result = run_stage(
            compose_stage(stage, f"stage.trainable={groups}"),
            callbacks=[recorders[stage]],
        )
        assert result["global_step"] == 3
        rec = recorders[stage]
        frozen = set(rec.before) - rec.trainable
        assert rec.changed == rec.trainable, (
            f"{stage}: trained {sorted(rec.changed ^ rec.trainable)[:5]} unexpectedly"
        )
        assert not (rec.changed & frozen)

    assert _groups(recorders["stage1"].trainable) == {"projector"}
    assert _groups(recorders["stage2"].trainable) == {"projector", "language_model"}
    stage3 = recorders["stage3"].trainable
    assert _groups(stage3) == {"projector", "language_model"}
    lm3 = {n for n in stage3 if n.startswith("language_model.")}
    assert lm3 and all(".mlp." in n for n in lm3), "stage 3 trains only FFNs in the LM"
    assert any(".mlp.router." in n for n in lm3) and any(".mlp.experts.3." in n for n in lm3)
    assert any("layers.1.mlp.gate_proj" in n for n in lm3), "dense FFNs of non-MoE layers train too"

    export = tmp_path / "artifacts" / "stage3" / "export"
    model = MoELlavaForCausalLM.from_pretrained(export)
    assert model.config.moe["layers"] == [0, 2] and model.config.moe["capacity_factor"] == 1.5
    assert sum(isinstance(m, SparseMoeBlock) for m in model.modules()) == 2
    assert (export / "tokenizer.json").is_file() and (export / "preprocessor_config.json").is_file()
    metrics = json.loads((tmp_path / "artifacts" / "stage3" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["resumed"] is False
    assert (tmp_path / "artifacts" / "stage3" / "COMPLETED").is_file()


def test_train_modules_patterns_override_the_stage_groups(compose_stage):
    recorder = ParameterChangeRecorder()
    run_stage(
        compose_stage("stage1", "train_modules=[projector\\.linear_2]", "stage.max_steps=2"),
        callbacks=[recorder],
    )
    assert recorder.trainable == {"projector.linear_2.weight", "projector.linear_2.bias"}
    assert recorder.changed == recorder.trainable


@pytest.mark.parametrize(
    ("groups", "patterns", "match"),
    [
        (["attention"], None, r"^stage\.trainable: unknown group 'attention'"),
        ([], ["nowhere\\.weight"], r"^train_modules: pattern 'nowhere\\\\.weight' matches no parameter"),
        ([], None, r"^stage\.trainable: selects no parameter"),
    ],
)
def test_a_trainable_set_that_selects_nothing_is_a_config_error(tiny_vlm, groups, patterns, match):
    with pytest.raises(ConfigError, match=match):
        configure_trainable(tiny_vlm, groups, patterns)


def test_stage3_continues_from_an_existing_moe_checkpoint(compose_stage, tmp_path):
    run_stage(compose_stage("stage1", "stage.max_steps=1"))
    run_stage(compose_stage("stage2", "stage.max_steps=1"))
    run_stage(compose_stage("stage3", "stage.max_steps=1", "moe.layers=[1]"))
    moe_export = tmp_path / "artifacts" / "stage3" / "export"
    # Continue MoE-tuning the MoE model on (new) data: no second upcycling, same layout.
    result = run_stage(
        compose_stage(
            "stage3",
            f"init_from={moe_export}",
            "run_dir=" + str(tmp_path / "continued"),
            "stage.max_steps=1",
        )
    )
    assert result["global_step"] == 1
    model = MoELlavaForCausalLM.from_pretrained(tmp_path / "continued" / "stage3" / "export")
    assert model.config.moe["layers"] == [1]


@pytest.mark.parametrize("options", [["trainer.precision=bf16-mixed"], ["stage.gradient_checkpointing=true"]])
def test_stage3_bf16_mixed_and_gradient_checkpointing_on_cpu(compose_stage, dense_export, options):
    recorder = ParameterChangeRecorder()
    result = run_stage(compose_stage("stage3", f"init_from={dense_export}", *options), callbacks=[recorder])
    assert result["global_step"] == 3 and torch.isfinite(torch.tensor(result["train/loss"]))
    assert recorder.changed == recorder.trainable


def test_progress_reaches_logs_without_a_terminal(shapesworld, tmp_path):
    """Without a terminal (Prefect, DVC, SLURM logs) the bar is tqdm's: step and loss lines as it trains."""
    overrides = [*shrunk_overrides(shapesworld, tmp_path), "stage=stage1", "trainer.enable_progress_bar=true"]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_llava.train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.split(r"[\r\n]", proc.stdout + proc.stderr)
    progress = [line for line in lines if re.search(r"\d+/\d+ \[.*train/loss=", line)]
    assert progress, "no tqdm step/loss line in the output"
