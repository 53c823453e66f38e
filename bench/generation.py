"""Generation: tokens/s of KV-cached greedy ``generate``, dense against MoE.

    python -m bench.generation [--quick] [--batch-sizes 1 8] [--prompt-len 32] [--new-tokens 64]

The bench-size dense model (:func:`bench.common.build_dense`, eval mode) and its upcycled twin
(evaluation capacity as stage 3 exports it) generate ``new_tokens`` tokens for the same prompts:
one 64x64 image and ``prompt_len`` text tokens each, equal lengths, EOS stopping off so that every
call produces exactly that many tokens. tokens/s = batch x new tokens / wall time of the whole
call (image encoding and prefill included); the MoE/dense ratio is paired per round.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark

from bench import common

SUITE = "generation"


def run(
    d_model=512, ffn=2048, layers=4, heads=8, batch_sizes=(1, 8), prompt_len=32, new_tokens=64, rounds=5
) -> dict:
    dense = common.build_dense(d_model, ffn, layers, heads).eval()
    moe = common.upcycled_copy(dense).eval()
    rows, measurements = [], []
    for batch_size in batch_sizes:
        batch = common.synthetic_batch(
            dense, batch_size, 1 + dense.num_image_tokens + prompt_len, seed=batch_size
        )
        prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}

        def generate(model, prompt=prompt, batch_size=batch_size):
            with torch.no_grad():
                out = model.generate(
                    **prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
                )
            assert out.shape == (batch_size, new_tokens), "every sequence gets new_tokens (EOS stopping off)"

        times = common.interleaved(
            {"dense": lambda: generate(dense), "moe": lambda: generate(moe)},
            rounds,
            label=f"generate {new_tokens} tokens, prompt {prompt_len} text + 64 image tokens",
            sub_label=f"batch {batch_size}",
        )
        measurements += [m for ms in times.values() for m in ms]
        tokens = batch_size * new_tokens
        rows.append(
            {
                "batch_size": batch_size,
                "tokens_per_s": {name: tokens / common.median_s(ms) for name, ms in times.items()},
                "moe_vs_dense_tokens_per_s": common.paired_ratio(times["dense"], times["moe"]),
            }
        )
    config = {
        "d_model": d_model,
        "ffn": ffn,
        "layers": layers,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
    }
    return {
        "config": {**config, "rounds": rounds},
        "environment": common.environment(torch.device("cpu")),
        "rows": rows,
        "measurements": measurements,
    }


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32, help="text tokens after the image's 64")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.ffn, args.prompt_len, args.new_tokens = 256, 1024, 8, 16
    rounds = args.rounds or (2 if args.quick else 5)
    result = run(args.d_model, args.ffn, 4, 8, args.batch_sizes, args.prompt_len, args.new_tokens, rounds)
    benchmark.Compare(result.pop("measurements")).print()
    for row in result["rows"]:
        tps = row["tokens_per_s"]
        print(
            f"batch {row['batch_size']}: tokens/s dense {tps['dense']:.1f}, MoE {tps['moe']:.1f}, "
            f"MoE/dense {row['moe_vs_dense_tokens_per_s']:.3f}"
        )
    print(f"written: {common.write_result(SUITE, result, args.out)}")


if __name__ == "__main__":
    main()
