"""Converting a full-size released checkpoint: time and peak memory of ``moe-llava model convert``.

Builds a checkpoint in the released layout of LanguageBind/MoE-LLaVA-Phi2-2.7B-4e at its real sizes
(Phi-2 2.7B with 16 MoE layers of 4 experts, CLIP-L/336; 5.6 B parameters, 11.2 GB bf16 in three
~5 GB safetensors shards plus the index, as the hub serves it) with random weights, streamed tensor
by tensor so the builder itself stays small; then runs the conversion in a child process and reads
the child's wall time and peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``); checks
the export's shards and a sample of tensors; deletes both folders unless ``--keep``.

    python -m bench.convert --root /work/bench-tmp            # full size (~23 GB of disk while it runs)
    python -m bench.convert --root /tmp/x --layers 2 --quick  # a smoke run at two decoder layers

Names and shapes come from the converter's own maps run backwards over our model's weights on the
meta device, which ``tests/model/convert/test_keymaps.py`` checks against the hub's key lists.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_llava.model.configuration import MoELlavaConfig
from moe_llava.model.convert import configmap, keymaps
from moe_llava.model.convert.layout import PlannedTensor, WeightFiles, write_safetensors_shards
from moe_llava.model.convert.released import expected_state

RESULTS = Path("bench_results")
HUB_SHARD_BYTES = 4_980_000_000  # the hub's shards: 4.98 + 4.98 + 1.25 GB


def phi2_4e_config(layers: int = 32) -> dict:
    """config.json of MoE-LLaVA-Phi2-2.7B-4e (reference doc 1.3; ``layers`` < 32 for a smoke run)."""
    moe_layers = list(range(0, layers, 2))
    return {
        "_name_or_path": "./checkpoints/MoE-LLaVA-Phi2-Stage2",
        "architectures": ["MoELLaVAPhiForCausalLM"],
        "model_type": "moe_llava_phi",
        "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "gelu_new", "partial_rotary_factor": 0.4,
        "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "qk_layernorm": False, "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.37.0",
        "mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024, "mm_video_tower": None,
        "image_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "tokenizer_padding_side": "right", "use_mm_proj": True,
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": moe_layers,
                "num_experts": [4] * len(moe_layers), "top_k_experts": 2, "capacity_factor": 1.5,
                "eval_capacity_factor": 2.0, "min_capacity": 0, "ep_size": 1, "use_residual": False,
                "router_aux_loss_coef": 0.01, "train_modules": ["fc1", "fc2", "wg"]},
    }  # fmt: skip


def build_released(folder: Path, config: dict, seed: int = 0) -> int:
    """Write the checkpoint (random bf16 weights, one tensor in memory at a time); returns its bytes."""
    from moe_llava.data.tokenizer import train_bpe_tokenizer

    backbone, fields, _ = configmap.released_to_ours(config, folder / "config.json")
    expected = expected_state(MoELlavaConfig(**fields, image_token_id=0))
    ops, unmapped = keymaps.ours_to_released(backbone, list(expected))
    assert not unmapped, unmapped
    generator = torch.Generator().manual_seed(seed)

    def random(shape):
        return lambda: torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.bfloat16)

    planned = [
        PlannedTensor(
            op.target, torch.bfloat16, expected[op.sources[0]][0], random(expected[op.sources[0]][0])
        )
        for op in ops
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors_shards(folder, planned, HUB_SHARD_BYTES)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    train_bpe_tokenizer(["a small tokenizer for the benchmark"] * 8, folder, vocab_size=300, min_frequency=1)
    return sum(p.nbytes for p in planned)


def convert(src: Path, dst: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, report) of ``moe-llava model convert`` in a child process.

    The peak is GNU time's (``%M``, the child's own after exec); ``getrusage(RUSAGE_CHILDREN)`` would
    also count the pages a forked child shares with this process before it execs."""
    command = [sys.executable, "-m", "moe_llava.cli", "model", "convert", str(src), str(dst), "--json"]
    gnu_time = shutil.which("time") or "/usr/bin/time"
    peak_file = dst.parent / "peak_rss_kb"
    measured = Path(gnu_time).is_file()
    if measured:
        command = [gnu_time, "-f", "%M", "-o", str(peak_file), *command]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"conversion failed ({done.returncode}): {done.stderr.strip()}")
    if measured:
        peak = int(peak_file.read_text().split()[-1]) * 1024
        peak_file.unlink()
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    return seconds, peak, done.stdout


def check(src: Path, dst: Path, samples: int = 8) -> int:
    """The export's tensors: all there, and a sample equal to their sources; returns their count."""
    source, target = WeightFiles(src), WeightFiles(dst)
    ops, _ = keymaps.released_to_ours("phi", list(source.infos))
    names = [op for op in ops if op.kind == "copy"][:: max(1, len(ops) // samples)]
    with source.reader() as a, target.reader() as b:
        for op in names:
            assert torch.equal(a.get(op.sources[0]).float(), b.get(op.target).float()), op.target
    return len(target.infos)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="scratch folder for the two checkpoints")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real checkpoint)")
    parser.add_argument("--quick", action="store_true", help="(kept for the suite runner) same as --layers 2")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--out", type=Path, default=RESULTS / "convert.json")
    args = parser.parse_args(argv)
    layers = 2 if args.quick else args.layers
    src, dst = args.root / "released-phi2-4e", args.root / "converted-phi2-4e"
    try:
        started = time.perf_counter()
        size = build_released(src, phi2_4e_config(layers))
        build_s = time.perf_counter() - started
        seconds, peak, report = convert(src, dst)
        tensors = check(src, dst)
        result = {
            "checkpoint": f"MoE-LLaVA-Phi2-2.7B-4e layout, {layers} layers, random bf16",
            "checkpoint_bytes": size,
            "source_shards": len(WeightFiles(src).shards),
            "build_s": round(build_s, 1),
            "convert_s": round(seconds, 1),
            "convert_peak_rss_bytes": peak,
            "peak_rss_over_checkpoint": round(peak / size, 3),
            "tensors": tensors,
            "report": json.loads(report),
        }
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
    print(
        f"{result['checkpoint']}: {size / 1e9:.2f} GB in {result['source_shards']} shards; built in {build_s:.0f} s; "
        f"converted in {seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB ({result['peak_rss_over_checkpoint']:.1%} "
        f"of the checkpoint), {tensors} tensors"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
