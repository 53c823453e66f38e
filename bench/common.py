"""What the benchmarks share: interleaved timing on ``torch.utils.benchmark``, the bench-size model
and its upcycled twin, synthetic batches, and the result file."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils import benchmark

from moe_llava.config import compose_config
from moe_llava.constants import IGNORE_INDEX
from moe_llava.model.builder import build_model
from moe_llava.training.stages import split_moe_settings

RESULTS = Path("bench_results")


# ---------------------------------------------------------------------------- timing
def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    *,
    label: str,
    sub_label: str,
    min_run_time: float | None = None,
    warmup: int = 1,
) -> dict[str, list[benchmark.Measurement]]:
    """One ``Timer`` measurement of every callable per round, in an order rotated by one each round.

    Interleaving spreads a shared machine's slow phases over all variants alike, so per-round
    ratios (:func:`paired_ratio`) stay meaningful when absolute times drift. ``min_run_time``: per
    measurement, ``Timer.blocked_autorange`` for that long (short calls); None: one call timed on
    its own (long calls, which ``Timer``'s own warm-up calls would triple).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    out: dict[str, list[benchmark.Measurement]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if min_run_time is None:
                seconds = [_seconds(fns[name])]
                out[name].append(measurement(seconds, label=label, sub_label=sub_label, description=name))
                continue
            timer = benchmark.Timer(
                "fn()",
                globals={"fn": fns[name]},
                label=label,
                sub_label=sub_label,
                description=name,
                num_threads=torch.get_num_threads(),
            )
            out[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return out


def _seconds(fn: Callable[[], object]) -> float:
    # Queued GPU work belongs to the call that queued it.
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measurement(
    seconds: list[float], *, label: str, sub_label: str, description: str
) -> benchmark.Measurement:
    """A ``Measurement`` of times taken some other way (e.g. per training batch), for ``Compare``."""
    spec = benchmark.TaskSpec(
        "", "", label=label, sub_label=sub_label, description=description, num_threads=torch.get_num_threads()
    )
    return benchmark.Measurement(number_per_run=1, raw_times=list(seconds), task_spec=spec)


def median_s(measurements: list[benchmark.Measurement]) -> float:
    return statistics.median(m.median for m in measurements)


def paired_ratio(numerator: list, denominator: list) -> float:
    """Median over rounds of numerator / denominator (``Measurement``s or seconds)."""
    value = lambda m: m.median if isinstance(m, benchmark.Measurement) else m  # noqa: E731
    return statistics.median(value(a) / value(b) for a, b in zip(numerator, denominator))


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------- result files
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (a minute or two)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default: the suite's)")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench_results/<suite>.json)")
    return parser


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_result(suite: str, result: dict, out: Path | None) -> Path:
    path = out or RESULTS / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------- models
def load_conf(node: str, *overrides: str) -> dict:
    """One node (``model``, ``moe``, ``stage`` ...) of the project's composed config (Hydra
    ``overrides``, e.g. ``stage=stage3``), as a plain dict."""
    return OmegaConf.to_container(compose_config(overrides)[node], resolve=True)


def build_dense(d_model: int, ffn: int, layers: int, heads: int, vocab: int = 1024, seed: int = 0):
    """A dense MoE-LLaVA model (random init): the tiny recipe's CLIP tower and projector in front of a
    Llama LM of the given size (default vocabulary: the ShapesWorld tokenizer's)."""
    tiny = load_conf("model")
    language_model = {
        "name_or_path": None,
        "config": {
            "model_type": "llama",
            "hidden_size": d_model,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 2048,
            "vocab_size": vocab,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    }
    torch.manual_seed(seed)
    return build_model(
        tiny["vision_tower"],
        language_model,
        pretrained=False,
        vision_feature_layer=int(tiny["vision_feature_layer"]),
    )


def upcycled_copy(dense):
    """The stage-3 model: a copy of ``dense`` upcycled with ``conf/moe/paper.yaml``'s settings."""
    settings, coefficients = split_moe_settings(load_conf("moe"))
    moe = copy.deepcopy(dense)
    moe.upcycle(**settings)
    for key, value in coefficients.items():
        setattr(moe.config, key, value)
    return moe


def synthetic_batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Per sample one text token, one image, then random text; loss on the second half; no padding.
    ``seq_len`` counts every token, the image's included."""
    n_img = model.num_image_tokens
    if seq_len < n_img + 2:
        raise ValueError(f"seq_len={seq_len} leaves no room for text around {n_img} image tokens")
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    ids = torch.randint(
        3, min(image_id, model.get_input_embeddings().num_embeddings), (batch_size, seq_len), generator=g
    )
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
        "image_mask": ids == image_id,
    }
