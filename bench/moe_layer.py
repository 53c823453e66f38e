"""The MoE layer against the dense FFN it was upcycled from and against ``transformers``' Mixtral block.

    python -m bench.moe_layer [--quick] [--tokens 64 512 2048] [--dtypes float32 bfloat16]

Per dtype, token count and mode (``fwd``: eval under ``no_grad``; ``fwd_bwd``: forward and backward
of a fixed output gradient), interleaved:

* ``dense``: the Llama FFN (SwiGLU) the experts are copies of;
* ``moe``: ``SparseMoeBlock`` (4 experts, top-2, dropless) with ``expert_path="auto"``, and
  ``moe[<path>]`` forced onto each other expert path this machine can run;
* ``mixtral[<impl>]``: ``transformers``' ``MixtralSparseMoeBlock`` with the same router and expert
  weights, per experts implementation (``eager``, ``grouped_mm``).

Numbers: ``moe / (k x dense)``: what routing and dispatch add to the k expert FFNs each token runs
(1.0 = nothing); ``mixtral / moe``: the fastest Mixtral implementation over ours (> 1 = ours is
faster); ``moe[<path>] / moe``: whether forcing ``expert_path`` would pay on this machine.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from bench import common
from moe_llava.model.moe import EXPERT_PATHS, SparseMoeBlock

SUITE = "moe_layer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm")


def build_blocks(
    d_model: int, ffn: int, dtype: torch.dtype, device: torch.device, experts=4, top_k=2
) -> dict:
    """The dense FFN, the MoE block on every expert path it can take, and Mixtral copies of it."""
    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=d_model, intermediate_size=ffn, hidden_act="silu"))
    dense = dense.to(device=device, dtype=dtype)
    moe = SparseMoeBlock.from_dense(dense, num_experts=experts, top_k=top_k)
    # Experts that differ and a fresh router, so a routing mistake would change the output.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_((torch.randn(p.shape, generator=generator) * 0.02 * p.float().std()).to(p))
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator) * d_model**-0.5)
    blocks = {"dense": dense, "moe": moe}
    auto = moe.resolve_expert_path(torch.zeros(1, d_model, device=device, dtype=dtype))
    for path in EXPERT_PATHS[1:]:
        if path == auto:
            continue
        try:
            forced = SparseMoeBlock.from_dense(dense, num_experts=experts, top_k=top_k, expert_path=path)
        except ValueError:  # e.g. no grouped GEMM in this torch
            continue
        forced.load_state_dict(moe.state_dict())
        blocks[f"moe[{path}]"] = forced
    for impl in MIXTRAL_IMPLEMENTATIONS:
        blocks[f"mixtral[{impl}]"] = mixtral_copy(moe, impl)
    return blocks


def mixtral_copy(block: SparseMoeBlock, implementation: str) -> MixtralSparseMoeBlock:
    """``MixtralSparseMoeBlock`` with ``block``'s router and experts (stacked, gate and up fused)."""
    first = block.experts[0]
    config = MixtralConfig(
        hidden_size=first.gate_proj.in_features,
        intermediate_size=first.gate_proj.out_features,
        num_local_experts=block.num_experts,
        num_experts_per_tok=block.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    mixtral = MixtralSparseMoeBlock(config).to(first.gate_proj.weight)
    with torch.no_grad():
        mixtral.gate.weight.copy_(block.router.weight)
        for i, expert in enumerate(block.experts):
            mixtral.experts.gate_up_proj[i].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            mixtral.experts.down_proj[i].copy_(expert.down_proj.weight)
    return mixtral


def output(module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out  # some transformers versions add router logits


def _call(module, x: torch.Tensor, grad: torch.Tensor | None):
    """The timed call: a forward under ``no_grad``, or a forward and backward (grads reset first)."""
    if grad is None:

        def fwd():
            with torch.no_grad():
                module(x)

        return fwd
    x = x.detach().requires_grad_(True)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        x.grad = None
        output(module, x).backward(grad)

    return fwd_bwd


def run(
    d_model=512,
    ffn=2048,
    tokens=(64, 512, 2048),
    dtypes=("float32", "bfloat16"),
    modes=("fwd", "fwd_bwd"),
    rounds=5,
    min_run_time=0.2,
    device="auto",
) -> dict:
    device = common.select_device(device)
    rows, measurements = [], []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        blocks = build_blocks(d_model, ffn, dtype, device)
        moe = blocks["moe"]
        for n in tokens:
            x = torch.randn(1, n, d_model, generator=torch.Generator().manual_seed(n)).to(
                device=device, dtype=dtype
            )
            if dtype == torch.float32:  # same routing, same experts: Mixtral computes what we compute
                with torch.no_grad():
                    torch.testing.assert_close(output(blocks["mixtral[eager]"].eval(), x), moe.eval()(x))
            for mode in modes:
                grad = torch.randn_like(x) if mode == "fwd_bwd" else None
                for block in blocks.values():
                    block.train(grad is not None)
                calls = {name: _call(block, x, grad) for name, block in blocks.items()}
                sub_label = f"{dtype_name:8s} {mode:7s} {n:5d} tokens"
                times = common.interleaved(
                    calls,
                    rounds,
                    label=f"MoE layer, d={d_model} F={ffn}",
                    sub_label=sub_label,
                    min_run_time=min_run_time,
                )
                measurements += [m for ms in times.values() for m in ms]
                mixtral = min(
                    (name for name in times if name.startswith("mixtral")),
                    key=lambda k: common.median_s(times[k]),
                )
                row = {
                    "dtype": dtype_name,
                    "tokens": n,
                    "mode": mode,
                    "expert_path": moe.last_expert_path,
                    "median_ms": {name: common.median_s(ms) * 1e3 for name, ms in times.items()},
                    "moe_vs_k_dense": common.paired_ratio(times["moe"], times["dense"]) / moe.top_k,
                    "fastest_mixtral": mixtral,
                    "mixtral_vs_moe": common.paired_ratio(times[mixtral], times["moe"]),
                    **{
                        f"{name}_vs_moe": common.paired_ratio(times[name], times["moe"])
                        for name in times
                        if name.startswith("moe[")
                    },
                }
                rows.append(row)
    config = {
        "d_model": d_model,
        "ffn": ffn,
        "tokens": list(tokens),
        "dtypes": list(dtypes),
        "rounds": rounds,
    }
    return {
        "config": config,
        "environment": common.environment(device),
        "rows": rows,
        "measurements": measurements,
    }


def summary(result: dict) -> str:
    lines = [
        f"{'dtype':9s} {'mode':8s} {'tokens':>6s} {'path':>10s} {'moe/(k*dense)':>13s} {'mixtral/moe':>16s}  other paths"
    ]
    for row in result["rows"]:
        others = "  ".join(
            f"{k[:-7]}/moe {v:.2f}" for k, v in row.items() if k.startswith("moe[") and k.endswith("_vs_moe")
        )
        lines.append(
            f"{row['dtype']:9s} {row['mode']:8s} {row['tokens']:6d} {row['expert_path']:>10s} "
            f"{row['moe_vs_k_dense']:13.3f} {row['mixtral_vs_moe']:6.2f} ({row['fastest_mixtral'][8:-1]:>10s})  {others}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.ffn, args.tokens = 256, 1024, [64, 512]
    rounds = args.rounds or (3 if args.quick else 5)
    min_run_time = 0.05 if args.quick else 0.2
    result = run(
        args.d_model, args.ffn, args.tokens, args.dtypes, args.modes, rounds, min_run_time, args.device
    )
    benchmark.Compare(result.pop("measurements")).print()
    print(summary(result))
    print(f"written: {common.write_result(SUITE, result, args.out)}")


if __name__ == "__main__":
    main()
