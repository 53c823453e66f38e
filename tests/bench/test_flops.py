"""The analytic FLOP counts agree with the models' parameter counts (2 FLOPs per weight per token)."""

from __future__ import annotations

import pytest
from torch import nn

from bench import flops, models
from moe_llava.training.stages import configure_trainable

SIZE = models.ModelSize(d_model=64, ffn=128, layers=4, heads=4, vocab=256)


@pytest.fixture(scope="module")
def pair():
    dense = models.build_dense(SIZE)
    return dense, models.upcycled_copy(dense)


def _lm_linear_weights(model, experts_per_token: int | None = None) -> int:
    """Weights a token passes through in the LM: every Linear (the tied LM head included), with an
    MoE layer's experts counted top_k times out of num_experts."""
    total = 0
    for name, module in model.language_model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
            if ".experts." in name:
                n = n * experts_per_token // 4
            total += n
    return total


def test_forward_flops_are_two_per_weight_per_token_plus_attention_scores(pair):
    dense, moe = pair
    seq = [20, 30]
    for model, k in ((dense, None), (moe, 2)):
        shape = flops.shape_of(model)
        result = flops.training_flops(shape, seq, images=0)
        tokens = sum(seq)
        scores = result["by_term"]["attn_scores"]
        assert scores == pytest.approx(4 * SIZE.d_model * SIZE.layers * sum(t * (t + 1) / 2 for t in seq) * 3)
        linear_forward = result["forward"] - scores / 3
        assert linear_forward == pytest.approx(2 * tokens * _lm_linear_weights(model, k))


def test_backward_follows_the_trainable_sets(pair):
    dense, moe = pair
    seq = [72]
    configure_trainable(dense, ["projector", "vision_tower", "language_model"])
    everything = flops.training_flops(flops.shape_of(dense), seq, images=1)
    assert everything["backward"] == pytest.approx(2 * everything["forward"])  # the usual 6N per token

    configure_trainable(moe, ["projector", "ffn"])  # stage 3: attention, embeddings and head frozen
    shape = flops.shape_of(moe)
    assert shape.moe_layers == (0, 2) and shape.top_k == 2 and shape.num_experts == 4
    assert not shape.train_vision and shape.train_projector and not any(shape.train_attention)
    stage3 = flops.training_flops(shape, seq, images=1)
    by_term = stage3["by_term"]
    fwd: dict[str, float] = {}
    for term in flops.image_terms(shape, 1) + flops.lm_terms(shape, 72, 72 * 73 / 2, 72):
        fwd[term.name] = fwd.get(term.name, 0.0) + term.forward
    assert by_term["vision"] == pytest.approx(fwd["vision"])  # frozen, nothing trains below: forward only
    assert by_term["projector"] == pytest.approx(2 * fwd["projector"])  # weight grads, no input grads
    assert by_term["attn_proj"] == pytest.approx(2 * fwd["attn_proj"])  # input grads only
    assert by_term["lm_head"] == pytest.approx(2 * fwd["lm_head"])
    assert by_term["experts"] == pytest.approx(3 * fwd["experts"])
    assert by_term["ffn"] == pytest.approx(3 * fwd["ffn"])


def test_generation_flops_count_prefill_and_decode_steps(pair):
    dense, moe = pair
    shape = flops.shape_of(dense)
    one = flops.generation_flops(shape, batch=1, prompt_len=70, new_tokens=1)
    two = flops.generation_flops(shape, batch=1, prompt_len=70, new_tokens=2)
    step = flops.lm_terms(shape, 1, 71, 1)  # one decode token attending to 71 cached positions
    assert two["total"] - one["total"] == pytest.approx(sum(t.forward for t in step))
    assert flops.generation_flops(shape, 8, 70, 4)["total"] == pytest.approx(
        8 * flops.generation_flops(shape, 1, 70, 4)["total"]
    )
    ratio = (
        flops.generation_flops(shape, 1, 70, 4)["total"]
        / flops.generation_flops(flops.shape_of(moe), 1, 70, 4)["total"]
    )
    assert 0.5 < ratio < 1


def test_decode_weight_bytes_count_the_experts_a_step_touches(pair):
    dense, moe = pair
    d, m = flops.shape_of(dense), flops.shape_of(moe)
    per_expert = 4 * 3 * SIZE.d_model * SIZE.ffn
    router = 4 * SIZE.d_model * 4
    # batch 1: top-2 experts per MoE layer (2 layers) -> one FFN's bytes extra per MoE layer, plus routers
    assert flops.decode_weight_bytes(m, 1) - flops.decode_weight_bytes(d, 1) == pytest.approx(
        2 * (per_expert + router)
    )
    # a large batch touches all 4 experts
    assert flops.decode_weight_bytes(m, 64) - flops.decode_weight_bytes(d, 64) == pytest.approx(
        2 * (3 * per_expert + router), rel=1e-6
    )
