"""Training step: stage 2 (dense) against stage 3 (MoE, upcycled from the same weights), as Lightning runs it.

    python -m bench.training [--quick] [--batch-size 8] [--seq-len 256] [--precision 32-true|bf16-mixed]

Each model trains through the project's own :class:`~moe_llava.training.lit_module.MoELlavaLitModule`
(its AdamW parameter groups and warmup + cosine schedule) under an ``L.Trainer`` with the stage
config's gradient clipping and the chosen precision: the step ``run_stage`` runs, without data
loading, checkpoints or logging. The dense model trains stage 2's set (projector + LM), the MoE
model stage 3's (projector + FFNs/experts + routers), both on the same synthetic batch.

A round fits each model for ``1 + steps`` batches (order alternating between rounds) and keeps the
time of every batch after the first (which allocates the optimizer state), from the start of the
batch to its end (forward, backward, clipping, optimizer and scheduler step). Numbers: tokens/s
of each model and the MoE/dense step-time ratio (paired per round), next to the ratio of
parameters each token runs through (what the ratio would be if time followed FLOPs).
"""

from __future__ import annotations

import logging
import statistics
import time

import lightning as L
import torch
from torch.utils import benchmark

from bench import common
from moe_llava.model.params import count_parameters
from moe_llava.training.lit_module import MoELlavaLitModule
from moe_llava.training.stages import configure_trainable

SUITE = "training"


class BatchTimer(L.Callback):
    """Wall time of each training batch, from its start to its end."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


def fit_batches(model, stage: dict, batch: dict, steps: int, precision: str, accelerator: str) -> list[float]:
    """Train ``model`` on ``batch`` for ``steps`` optimizer steps as ``run_stage`` does; batch times."""
    module = MoELlavaLitModule(
        model,
        lr=float(stage["lr"]),
        weight_decay=float(stage["weight_decay"]),
        warmup_ratio=float(stage["warmup_ratio"]),
        lr_scale=stage.get("lr_scale"),
    )
    timer = BatchTimer()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no set-up banner per fit
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        gradient_clip_val=stage["max_grad_norm"] or None,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model.train()
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def run(
    d_model=512,
    ffn=2048,
    layers=4,
    heads=8,
    batch_size=8,
    seq_len=256,
    precision="32-true",
    rounds=5,
    steps=2,
    device="auto",
) -> dict:
    accelerator = "gpu" if common.select_device(device).type == "cuda" else "cpu"
    dense = common.build_dense(d_model, ffn, layers, heads)
    moe = common.upcycled_copy(dense)
    models = {
        "dense": (dense, common.load_conf("stage", "stage=stage2")),
        "moe": (moe, common.load_conf("stage", "stage=stage3")),
    }
    for model, stage in models.values():
        configure_trainable(model, stage["trainable"])
    batch = common.synthetic_batch(dense, batch_size, seq_len, seed=1)

    seconds: dict[str, list[float]] = {"dense": [], "moe": []}  # per round: median over its batches
    for r in range(rounds):
        for name in ("dense", "moe") if r % 2 == 0 else ("moe", "dense"):
            model, stage = models[name]
            times = fit_batches(model, stage, batch, 1 + steps, precision, accelerator)[1:]
            seconds[name].append(statistics.median(times))
    tokens = batch_size * seq_len
    # The LM's weights each token runs through (top-k of the experts): the step-time ratio if time followed FLOPs.
    per_token = {
        name: count_parameters(model).parts["language_model"].activated for name, (model, _) in models.items()
    }
    label = f"training step, d={d_model} F={ffn} L={layers}, {batch_size}x{seq_len} tokens, {precision}"
    result = {
        "config": {
            "d_model": d_model,
            "ffn": ffn,
            "layers": layers,
            "heads": heads,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "precision": precision,
            "rounds": rounds,
            "steps": steps,
        },
        "environment": common.environment(common.select_device(device)),
        "step_ms": {name: statistics.median(s) * 1e3 for name, s in seconds.items()},
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
        "moe_vs_dense_time": common.paired_ratio(seconds["moe"], seconds["dense"]),
        "moe_vs_dense_parameters_per_token": per_token["moe"] / per_token["dense"],
        "moe_layers": moe.config.moe["layers"],
        "measurements": [
            common.measurement(s, label=label, sub_label=name, description="step")
            for name, s in seconds.items()
        ],
    }
    return result


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--seq-len", type=int, default=256, help="tokens per sequence, the 64 image tokens included"
    )
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.ffn, args.heads, args.batch_size, args.seq_len = 256, 1024, 4, 2, 128
    rounds = args.rounds or (2 if args.quick else 5)
    size = (args.d_model, args.ffn, args.layers, args.heads, args.batch_size, args.seq_len)
    result = run(*size, args.precision, rounds=rounds, device=args.device)
    benchmark.Compare(result.pop("measurements")).print()
    print(
        f"tokens/s: dense {result['tokens_per_s']['dense']:.0f}, MoE {result['tokens_per_s']['moe']:.0f}; "
        f"MoE/dense step time {result['moe_vs_dense_time']:.3f} "
        f"(LM parameters run per token: {result['moe_vs_dense_parameters_per_token']:.3f})"
    )
    print(f"written: {common.write_result(SUITE, result, args.out)}")


if __name__ == "__main__":
    main()
