"""Upcycling any `transformers` decoder-only LM: the MoE model computes exactly what the dense one did."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moe_llava.model import SparseMoeBlock, find_decoder_layers, resolve_moe_layers, upcycle_to_moe
from tests.conftest import VOCAB, tiny_llama_config, tiny_phi_config, tiny_qwen2_config

CONFIGS = {"llama": tiny_llama_config, "qwen2": tiny_qwen2_config, "phi": tiny_phi_config}


def dense_lm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi"])
@pytest.mark.parametrize("capacity", [None, 2.0])
def test_upcycled_logits_equal_dense(kind, capacity):
    model = dense_lm(kind)
    input_ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        dense_logits = model(input_ids).logits
        indices = upcycle_to_moe(
            model, num_experts=4, top_k=2, capacity_factor=capacity, eval_capacity_factor=capacity
        )
        # A random router that prefers different experts per token: identity must not depend on it.
        for layer in find_decoder_layers(model):
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.router.weight.normal_(0, 1)
        moe_logits = model(input_ids).logits
    assert indices == [0, 2]
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)


def test_training_capacity_identity_when_nothing_dropped():
    model = dense_lm("llama").train()
    input_ids = torch.randint(0, VOCAB, (2, 16))
    torch.manual_seed(0)
    dense = model(input_ids).logits
    upcycle_to_moe(model, capacity_factor=2.0, layers="dense")
    torch.manual_seed(0)
    torch.testing.assert_close(model(input_ids).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("sparse", [0, 2, 4]),
        ("first_half", [0, 1, 2]),
        ("second_half", [3, 4, 5]),
        ("dense", [0, 1, 2, 3, 4, 5]),
        ([5, 1], [1, 5]),
        ([-1], [5]),
    ],
)
def test_layer_modes(mode, expected):
    assert resolve_moe_layers(mode, 6) == expected


def test_upcycle_converts_exactly_the_chosen_layers_with_copies():
    model = dense_lm("phi")
    layers = find_decoder_layers(model)
    dense_state = {i: {k: v.clone() for k, v in layers[i].mlp.state_dict().items()} for i in range(4)}
    assert upcycle_to_moe(model, num_experts=3, top_k=1, layers=[1, 3]) == [1, 3]
    for i, layer in enumerate(layers):
        assert isinstance(layer.mlp, SparseMoeBlock) == (i in (1, 3))
        if i in (1, 3):
            assert len(layer.mlp.experts) == 3
            for expert in layer.mlp.experts:
                for key, value in expert.state_dict().items():
                    assert torch.equal(value, dense_state[i][key])
            # Copies, not shared tensors: experts can diverge during training.
            assert layer.mlp.experts[0].fc1.weight.data_ptr() != layer.mlp.experts[1].fc1.weight.data_ptr()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 1, "top_k": 1}, "num_experts"),
        ({"layers": "every_other"}, "layers"),
        ({"layers": [0, 4]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": []}, "layers"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(kwargs, setting):
    model = dense_lm("llama")
    with pytest.raises(ValueError, match=setting):
        upcycle_to_moe(model, **kwargs)
    assert not any(isinstance(m, SparseMoeBlock) for m in model.modules()), (
        "a failed upcycle must change nothing"
    )


def test_model_without_recognisable_ffn():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    with pytest.raises(ValueError, match="no recognisable FFN"):
        upcycle_to_moe(Decoder(), layers="dense")


def test_upcycling_twice_is_refused():
    model = dense_lm("qwen2")
    upcycle_to_moe(model)
    with pytest.raises(ValueError, match="already a SparseMoeBlock"):
        upcycle_to_moe(model)


def test_blocks_inherit_train_or_eval_mode():
    model = dense_lm("llama")  # eval
    upcycle_to_moe(model, capacity_factor=1.5, eval_capacity_factor=2.0)
    assert not any(m.training for m in model.modules())


def test_paper_config_chooses_the_expert_path_automatically():
    from omegaconf import OmegaConf

    from moe_llava.paths import CONF_DIR
    from moe_llava.training.stages import split_moe_settings

    settings, _ = split_moe_settings(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "moe" / "paper.yaml")))
    assert settings["expert_path"] == "auto"
    model = dense_lm("llama")
    upcycle_to_moe(model, **settings)
    assert {m.expert_path for m in model.modules() if isinstance(m, SparseMoeBlock)} == {"auto"}


def test_expert_path_setting_reaches_every_block():
    model = dense_lm("llama")
    upcycle_to_moe(model, expert_path="loop")
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.expert_path == "loop" and b.experts.layout == "gated" for b in blocks)
    with pytest.raises(ValueError, match="expert_path"):
        upcycle_to_moe(dense_lm("llama"), expert_path="fast")
