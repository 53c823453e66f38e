"""The stage's callbacks without a Trainer: throughput per step from Lightning's Throughput."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_llava.training import callbacks
from moe_llava.training.callbacks import StepThroughput
from moe_llava.training.lit_module import MoELlavaLitModule


class Module:
    def __init__(self):
        self.logged: list[dict] = []

    def log(self, name, value, **kwargs):
        self.logged.append({"name": name, "value": value, **kwargs})


def batch(samples: int, tokens_per_sample: int) -> dict:
    padding = torch.zeros(samples, 8 - tokens_per_sample)
    return {
        "input_ids": torch.zeros(samples, 8, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(samples, tokens_per_sample), padding], dim=1),
    }


@pytest.mark.parametrize("window", [1, 2])
def test_tokens_and_samples_per_second_of_each_step(monkeypatch, window):
    # each step takes 0.5 s from batch start to batch end; 1.5 s pass between steps (data loading)
    clock = itertools.accumulate(itertools.cycle([0.5, 1.5]), initial=10.0)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    throughput, module = StepThroughput(window), Module()
    throughput.on_train_start(None, module)
    rates = []
    for step, (samples, tokens) in enumerate([(2, 4), (4, 8), (4, 2)]):
        throughput.on_train_batch_start(None, module, batch(samples, tokens), step)
        throughput.on_train_batch_end(None, module, None, batch(samples, tokens), step)
        rates.append({entry["name"]: entry["value"] for entry in module.logged})
        module.logged_before, module.logged = module.logged, []
        assert all(e["on_step"] and e["batch_size"] == 1 for e in module.logged_before)
        assert all(
            bool(e.get("prog_bar")) == (e["name"] == "train/tokens_per_sec") for e in module.logged_before
        )
    if window == 1:  # each step on its own: its tokens / 0.5 s, from the first step on
        assert rates[0] == {"train/tokens_per_sec": 2 * 4 / 0.5, "train/samples_per_sec": 2 / 0.5}
        assert rates[1] == {"train/tokens_per_sec": 4 * 8 / 0.5, "train/samples_per_sec": 4 / 0.5}
        assert rates[2] == {"train/tokens_per_sec": 4 * 2 / 0.5, "train/samples_per_sec": 4 / 0.5}
    else:  # the last two steps together, once there are two; the 1.5 s between steps do not count
        assert rates[0] == {}
        assert rates[1] == {"train/tokens_per_sec": (8 + 32) / 1.0, "train/samples_per_sec": 6 / 1.0}
        assert rates[2] == {"train/tokens_per_sec": (32 + 8) / 1.0, "train/samples_per_sec": 8 / 1.0}


def test_every_stage_logs_its_throughput():
    module = MoELlavaLitModule(torch.nn.Linear(1, 1), lr=1e-3)
    assert [type(c) for c in module.configure_callbacks()] == [StepThroughput]
