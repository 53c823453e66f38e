"""Expert-load recording on a known routing: shares by modality (from the mask), entropy, plot data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_llava.evaluation import (
    ExpertLoadRecorder,
    expert_load_metrics,
    expert_load_plot_data,
    plot_expert_load,
)
from moe_llava.model.moe import SparseMoeBlock, moe_blocks

E, D = 4, 8


def forced_block() -> SparseMoeBlock:
    """A block whose router scores expert e by 10 * x[e]: the routing of a crafted input is known."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
    block = SparseMoeBlock.from_dense(mlp, num_experts=E, top_k=2).eval()
    with torch.no_grad():
        block.router.weight.copy_(10 * torch.eye(E, D))
    return block


def crafted(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Hidden states whose top-1 expert is `first` and top-2 `second` (token-wise)."""
    x = torch.zeros(*first.shape, D)
    x.scatter_(-1, first.unsqueeze(-1), 1.0)
    x.scatter_(-1, second.unsqueeze(-1), 0.5)
    return x


def token_entropy() -> float:
    probs = torch.tensor([10.0, 5.0, 0.0, 0.0]).softmax(-1)
    return float(-(probs * probs.log()).sum())


def test_recorder_counts_a_known_routing_by_modality_mask():
    block = forced_block()
    first = torch.tensor([[0, 0, 1, 3, 3, 2], [2, 0, 0, 3, 1, 1]])
    second = (first + 1) % E
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)  # any positions
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # (1, 0) is left padding
    block.padding_mask, block.modality_mask = attention, image
    with ExpertLoadRecorder(block) as recorder:
        block(crafted(first, second))
        block(crafted(first[:, :1], second[:, :1]))  # a decode step: shapes differ from the masks
    block(crafted(first, second))  # after the context: not recorded
    summary = recorder.summary()
    (layer,) = summary["layers"]
    valid = attention.bool()

    def counts(choice, mask):
        return torch.bincount(choice[mask & valid], minlength=E).tolist()

    assert layer["tokens"] == {"all": 11, "image": 5, "text": 6}
    assert layer["top1"]["image"] == counts(first, image) == [2, 2, 0, 1]
    assert layer["top1"]["text"] == counts(first, ~image) == [2, 1, 1, 2]
    assert layer["top1"]["all"] == [a + b for a, b in zip(layer["top1"]["image"], layer["top1"]["text"])]
    assert layer["assigned"]["image"] == [x + y for x, y in zip(counts(first, image), counts(second, image))]
    assert layer["top1_share"]["image"] == pytest.approx([2 / 5, 2 / 5, 0, 1 / 5])
    assert layer["entropy"] == pytest.approx(token_entropy(), rel=1e-5)
    assert layer["drop_rate"] == 0.0  # dropless block
    assert layer["decode_tokens_not_counted"] == 2
    assert summary["prefill_forwards"] == 1


@pytest.fixture
def forced_moe_model(moe_export):
    """The tiny MoE export with every block's input replaced at prefill: image tokens route to
    expert 0 (then 1), text tokens to expert 3 (then 2), decided by the block's modality mask only."""
    from moe_llava.inference import load_pretrained

    loaded = load_pretrained(moe_export)
    blocks = moe_blocks(loaded.model.language_model)
    assert len(blocks) == 2

    def force(block, args):
        (hidden,) = args
        mask = block.modality_mask
        if mask is None or mask.shape != hidden.shape[:-1]:
            return None
        first = torch.where(mask, 0, 3)
        second = torch.where(mask, 1, 2)
        x = torch.zeros_like(hidden)
        x.scatter_(-1, first.unsqueeze(-1), 1.0)
        x.scatter_(-1, second.unsqueeze(-1), 0.5)
        return (x,)

    for _, block in blocks:
        with torch.no_grad():
            block.router.weight.zero_()
            block.router.weight[:, :E].copy_(10 * torch.eye(E))
        block.register_forward_pre_hook(force)
    return loaded


def test_generation_records_image_and_text_tokens_from_the_collator_mask(forced_moe_model, shapesworld):
    from moe_llava.data.dataset import LlavaDataset
    from moe_llava.inference import generate_answers

    loaded = forced_moe_model
    dataset = LlavaDataset(
        shapesworld / "pope_random.jsonl",
        loaded.tokenizer,
        image_folder=shapesworld / "images",
        limit=5,
        **loaded.dataset_kwargs,
    )
    n_image = 5 * loaded.model.num_image_tokens
    n_text = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))) - n_image
    with ExpertLoadRecorder(loaded.model.language_model) as recorder:
        answers = generate_answers(loaded, dataset, batch_size=2, max_new_tokens=3)  # batches 2+2+1: padding
    assert len(answers) == 5
    summary = recorder.summary()
    assert [layer["layer"] for layer in summary["layers"]] == [0, 2]
    for layer in summary["layers"]:
        assert layer["tokens"] == {"all": n_image + n_text, "image": n_image, "text": n_text}
        assert layer["top1"]["image"] == [n_image, 0, 0, 0]
        assert layer["top1"]["text"] == [0, 0, 0, n_text]
        assert layer["assigned"]["image"] == [n_image, n_image, 0, 0]
        assert layer["assigned"]["text"] == [0, 0, n_text, n_text]
        assert layer["top1_share"]["all"] == pytest.approx(
            [n_image / (n_image + n_text), 0, 0, n_text / (n_image + n_text)]
        )
        assert layer["entropy"] == pytest.approx(token_entropy(), rel=1e-5)
        assert layer["decode_tokens_not_counted"] > 0
    assert summary["prefill_forwards"] == 3

    # the figure draws exactly these shares (stacked bars per expert) and entropies
    data = expert_load_plot_data(summary)
    fig = plot_expert_load(summary)
    bar_axes, entropy_ax = fig.axes[:3], fig.axes[3]
    for ax, modality in zip(bar_axes, ("all", "image", "text")):
        assert len(ax.containers) == E
        for e, container in enumerate(ax.containers):
            heights = [patch.get_height() for patch in container.patches]
            expected = [layer["top1_share"][modality][e] for layer in summary["layers"]]
            assert heights == pytest.approx(expected)
            assert data["shares"][modality][e] == pytest.approx(expected)
    image_bars = [[p.get_height() for p in c.patches] for c in bar_axes[1].containers]
    assert image_bars == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert list(entropy_ax.lines[0].get_ydata()) == pytest.approx([token_entropy()] * 2, rel=1e-5)
    assert data["max_entropy"] == pytest.approx(math.log(E))

    metrics = expert_load_metrics(summary)
    assert metrics["moe/layer2/image_expert0_load"] == 1.0
    assert metrics["moe/layer2/text_expert3_load"] == 1.0
    assert metrics["moe/layer0/image_tokens"] == n_image


def test_plot_is_written_as_png(tmp_path):
    block = forced_block()
    block.modality_mask = torch.tensor([[True, False]])
    with ExpertLoadRecorder(block) as recorder:
        block(crafted(torch.tensor([[1, 2]]), torch.tensor([[0, 0]])))
    path = tmp_path / "plots" / "expert_load.png"
    plot_expert_load(recorder.summary(), path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dense_model_has_nothing_to_record():
    with pytest.raises(ValueError, match="no MoE layer"):
        ExpertLoadRecorder(nn.Linear(2, 2))
