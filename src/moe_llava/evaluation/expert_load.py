"""Expert-load analysis: how each MoE layer routes image tokens and text tokens during evaluation.

:class:`ExpertLoadRecorder` registers a forward hook on every :class:`SparseMoeBlock` and adds up
the block's :class:`RouterStats` after each forward: per expert, how many tokens had it as top-1
and how many of the top-k assignments it received, for all tokens and split by modality, plus the
routing entropy (weighted by tokens) and the assignments kept after capacity.

Which tokens count: the **prompt tokens of every question** (the prefill forward of generation:
the image tokens and the question's text tokens, padding excluded). The image/text split comes
from the collator's ``image_mask`` (the model passes it to the blocks with
:func:`~moe_llava.model.moe.set_routing_masks`), never from a fixed token count. The decode steps
of generation (one token per sequence) are *not* counted, only tallied as
``decode_tokens_not_counted``: at those steps the blocks receive no padding mask, so the tokens of
sequences that already finished (padding fed until the whole batch stops) could not be told apart
from real answer tokens, and the answers of these benchmarks are a word or two while the prompts
carry all the image tokens the paper's analysis is about.

:func:`plot_expert_load` draws the paper-style figure: per layer, the share of tokens whose top-1
is each expert (all, image and text tokens; stacked bars) and the routing entropy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_llava.model.moe import SparseMoeBlock, moe_blocks

MODALITIES = ("all", "image", "text")
SCOPE = (
    "prompt tokens (prefill: image + question text, padding excluded); "
    "generated tokens (decode steps) are not counted"
)


@dataclass
class _LayerCounts:
    num_experts: int
    top1: dict[str, torch.Tensor] = field(default_factory=dict)
    assigned: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: torch.Tensor | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    entropy_sum: float = 0.0  # sum over tokens of the routing entropy (nats)

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.num_experts, dtype=torch.long)  # noqa: E731
        self.top1 = {m: zeros() for m in MODALITIES}
        self.assigned = {m: zeros() for m in MODALITIES}
        self.kept = zeros()
        self.tokens = dict.fromkeys(MODALITIES, 0)


def layer_index(name: str, position: int) -> int:
    """Decoder layer number of a block named like ``model.layers.12.mlp`` (else its position)."""
    found = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else position


class ExpertLoadRecorder:
    """Context manager recording the routing of every MoE block of ``model`` (see the module docstring).

    >>> with ExpertLoadRecorder(model) as recorder:
    ...     generate_answers(loaded, dataset)
    >>> summary = recorder.summary()
    """

    def __init__(self, model: nn.Module):
        self.blocks: list[tuple[str, SparseMoeBlock]] = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE layer (SparseMoeBlock): nothing to record")
        self.counts = {name: _LayerCounts(block.num_experts) for name, block in self.blocks}
        self.decode_tokens = dict.fromkeys(self.counts, 0)
        self.forwards = 0
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertLoadRecorder:
        for name, block in self.blocks:
            self._handles.append(block.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(block: SparseMoeBlock, args: tuple, output: Any) -> None:
            token_shape = tuple(args[0].shape[:-1])
            mask = block.modality_mask
            stats = block.last_stats
            if mask is None or tuple(mask.shape) != token_shape or stats is None or stats.image_top1 is None:
                # a decode step (one new token per sequence) or a forward without a modality mask
                self.decode_tokens[name] += math.prod(token_shape)
                return
            self._add(self.counts[name], stats)
            if name == self.blocks[0][0]:
                self.forwards += 1

        return hook

    @staticmethod
    def _add(counts: _LayerCounts, stats: Any) -> None:
        cpu = lambda t: t.detach().to("cpu", torch.long)  # noqa: E731
        for modality, top1, assigned in (
            ("all", stats.top1, stats.assigned),
            ("image", stats.image_top1, stats.image_assigned),
            ("text", stats.text_top1, stats.text_assigned),
        ):
            counts.top1[modality] += cpu(top1)
            counts.assigned[modality] += cpu(assigned)
            counts.tokens[modality] += int(top1.sum())
        counts.kept += cpu(stats.kept)
        counts.entropy_sum += float(stats.entropy) * int(stats.num_tokens)

    def summary(self) -> dict[str, Any]:
        """The recorded load as plain JSON data (what ``expert_load.json`` holds)."""
        first = self.blocks[0][1]
        layers = []
        for position, (name, block) in enumerate(self.blocks):
            c = self.counts[name]
            assigned_all = int(c.assigned["all"].sum())
            layers.append(
                {
                    "layer": layer_index(name, position),
                    "name": name,
                    "num_experts": block.num_experts,
                    "top_k": block.top_k,
                    "tokens": dict(c.tokens),
                    "top1": {m: c.top1[m].tolist() for m in MODALITIES},
                    "assigned": {m: c.assigned[m].tolist() for m in MODALITIES},
                    "kept": c.kept.tolist(),
                    "top1_share": {m: _shares(c.top1[m]) for m in MODALITIES},
                    "assigned_share": {m: _shares(c.assigned[m]) for m in MODALITIES},
                    "entropy": c.entropy_sum / c.tokens["all"] if c.tokens["all"] else 0.0,
                    "max_entropy": math.log(block.num_experts),
                    "drop_rate": 1.0 - int(c.kept.sum()) / assigned_all if assigned_all else 0.0,
                    "decode_tokens_not_counted": self.decode_tokens[name],
                }
            )
        return {
            "scope": SCOPE,
            "num_experts": first.num_experts,
            "top_k": first.top_k,
            "prefill_forwards": self.forwards,
            "layers": layers,
        }


def _shares(counts: torch.Tensor) -> list[float]:
    total = int(counts.sum())
    return [int(c) / total if total else 0.0 for c in counts]


def expert_load_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics, named like the training run's: ``moe/layer<i>/expert<e>_load`` (top-1 share,
    all tokens), ``image_expert<e>_load``, ``text_expert<e>_load``, ``entropy``, ``drop_rate``,
    plus the counted ``image_tokens`` / ``text_tokens``."""
    metrics: dict[str, float] = {}
    for layer in summary["layers"]:
        prefix = f"moe/layer{layer['layer']}"
        for modality, label in (("all", ""), ("image", "image_"), ("text", "text_")):
            for e, share in enumerate(layer["top1_share"][modality]):
                metrics[f"{prefix}/{label}expert{e}_load"] = share
        metrics[f"{prefix}/entropy"] = layer["entropy"]
        metrics[f"{prefix}/drop_rate"] = layer["drop_rate"]
        metrics[f"{prefix}/image_tokens"] = layer["tokens"]["image"]
        metrics[f"{prefix}/text_tokens"] = layer["tokens"]["text"]
    return metrics


def expert_load_plot_data(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`plot_expert_load` draws: layer labels, per modality an (experts x layers) share
    table (top-1 shares; each column sums to 1 when the layer saw tokens of that modality), the
    entropy per layer and its maximum log(E)."""
    layers = summary["layers"]
    num_experts = max(layer["num_experts"] for layer in layers)
    shares = {
        m: [
            [layer["top1_share"][m][e] if e < layer["num_experts"] else 0.0 for layer in layers]
            for e in range(num_experts)
        ]
        for m in MODALITIES
    }
    return {
        "layers": [layer["layer"] for layer in layers],
        "num_experts": num_experts,
        "shares": shares,
        "tokens": {m: [layer["tokens"][m] for layer in layers] for m in MODALITIES},
        "entropy": [layer["entropy"] for layer in layers],
        "max_entropy": math.log(num_experts),
    }


def plot_expert_load(summary: Mapping[str, Any], path: str | Path | None = None, *, title: str | None = None):
    """Draw the expert-load figure (and save it as PNG to ``path`` when given); returns the Figure.

    Panels: top-1 share of each expert per MoE layer for all tokens, image tokens and text tokens
    (stacked bars, one colour per expert, a dashed line per 1/E step marks a uniform load), and the
    mean routing entropy per layer against its maximum log(E).
    """
    # A bare Figure (no pyplot): no global state, no GUI backend; PNGs are rendered by Agg.
    import matplotlib
    from matplotlib.figure import Figure

    data = expert_load_plot_data(summary)
    x = list(range(len(data["layers"])))
    labels = [str(layer) for layer in data["layers"]]
    num_experts = data["num_experts"]
    colors = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(4 * len(MODALITIES) + 4, 3.6), layout="constrained")
    axes = fig.subplots(1, len(MODALITIES) + 1)
    titles = {"all": "all tokens", "image": "image tokens", "text": "text tokens"}
    for ax, modality in zip(axes, MODALITIES):
        bottom = [0.0] * len(x)
        for e in range(num_experts):
            heights = data["shares"][modality][e]
            ax.bar(x, heights, bottom=bottom, color=colors[e % len(colors)], label=f"expert {e}", width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for k in range(1, num_experts):
            ax.axhline(k / num_experts, color="black", linestyle="--", linewidth=0.6, alpha=0.5)
        ax.set_title(f"{titles[modality]} ({data['tokens'][modality][0]})")
        ax.set_xticks(x, labels)
        ax.set_xlabel("MoE layer")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of tokens (top-1 expert)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=num_experts, fontsize="small", frameon=False)
    ax = axes[-1]
    ax.plot(x, data["entropy"], marker="o", label="mean entropy")
    ax.axhline(data["max_entropy"], color="black", linestyle="--", linewidth=0.8, label="max log(E)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, data["max_entropy"] * 1.1)
    ax.set_ylabel("routing entropy (nats)")
    ax.set_title("routing entropy")
    ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
