"""LoRA adapters with peft on the model itself: per-expert adapters, merging, adapter exports, bad settings."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from moe_llava.errors import CheckpointError, ConfigError
from moe_llava.model import MoELlavaForCausalLM, SparseMoeBlock
from moe_llava.model.checkpoint import load_export_model
from moe_llava.model.configuration import MoELlavaConfig
from moe_llava.model.lora import (
    LoraSettings,
    apply_lora,
    is_adapted,
    merge_adapter,
    merge_lora,
    resolve_targets,
    save_adapter,
    trainable_counts,
)
from moe_llava.paths import CONF_DIR
from tests.conftest import IMAGE_TOKEN_ID, multimodal_batch, tiny_phi_config, tiny_vision_config

EXPERTS = LoraSettings(
    r=4,
    alpha=8,
    dropout=0.0,
    target_modules=(r"^language_model\..*\.mlp\.(experts\.\d+\.)?(gate_proj|up_proj|down_proj)$",),
    full_modules=(r"^projector$", r"\.router$"),
)


@pytest.fixture
def moe_vlm(tiny_vlm) -> MoELlavaForCausalLM:
    tiny_vlm.upcycle(num_experts=4, top_k=2, layers="sparse")  # MoE layers 0 and 2
    return tiny_vlm


def _train(model: nn.Module, steps: int = 3, seed: int = 0) -> None:
    """A few AdamW steps on the trainable parameters (the adapters and the full modules)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = multimodal_batch(model, seed=seed + step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_each_expert_gets_its_own_adapters_and_they_diverge(moe_vlm):
    before = {n: p.detach().clone() for n, p in moe_vlm.named_parameters()}
    apply_lora(moe_vlm, EXPERTS)
    trainable = {n for n, p in moe_vlm.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    for e in range(4):
        assert f"language_model.model.layers.0.mlp.experts.{e}.up_proj.lora_A.default.weight" in trainable
    assert "language_model.model.layers.1.mlp.up_proj.lora_B.default.weight" in trainable, "dense FFNs too"
    assert "language_model.model.layers.0.mlp.router.modules_to_save.default.weight" in trainable
    counts = trainable_counts(moe_vlm)
    assert set(counts) == {"experts.lora", "ffn.lora", "projector.full", "routers.full", "total", "frozen"}
    assert counts["total"] == sum(p.numel() for n, p in moe_vlm.named_parameters() if n in trainable)

    _train(moe_vlm)
    after = dict(moe_vlm.named_parameters())
    changed = {n for n, p in after.items() if n in before and not torch.equal(before[n], p.detach())}
    assert not changed, f"frozen base weights moved: {sorted(changed)[:3]}"
    for layer in (0, 2):
        deltas = []
        for e in range(4):
            prefix = f"language_model.model.layers.{layer}.mlp.experts.{e}.down_proj"
            a, b = after[f"{prefix}.lora_A.default.weight"], after[f"{prefix}.lora_B.default.weight"]
            assert b.abs().sum() > 0, "lora_B starts at zero and trained"
            deltas.append((b @ a).detach())
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.allclose(deltas[i], deltas[j]), f"layer {layer}: experts {i} and {j} alike"


def test_merged_and_unmerged_models_give_equal_logits(moe_vlm):
    peft_model = apply_lora(moe_vlm, EXPERTS)
    _train(moe_vlm)
    batch = multimodal_batch(moe_vlm, seed=7)
    with torch.no_grad():
        adapted = moe_vlm(**batch).logits
    merged = merge_lora(peft_model)
    assert not is_adapted(merged) and type(merged) is MoELlavaForCausalLM
    assert all(".lora_" not in n and "base_layer" not in n for n in merged.state_dict())
    assert type(merged.language_model.model.layers[0].mlp.experts[0].up_proj) is nn.Linear
    with torch.no_grad():
        plain = merged(**batch).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_export_merges_into_its_dense_base_like_the_in_place_merge(tiny_vlm, tmp_path):
    tiny_vlm.save_pretrained(tmp_path / "base")  # the dense stage-2 export the stage starts from
    model = load_export_model(tmp_path / "base")
    model.upcycle(num_experts=4, top_k=2, layers=[1, 3])
    peft_model = apply_lora(model, EXPERTS)
    _train(model)
    model.config.conversation_template = "plain"  # what the stage records before exporting
    save_adapter(peft_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    with pytest.raises(CheckpointError, match=r"LoRA adapters only .* merge-lora"):
        load_export_model(tmp_path / "adapter")

    rebuilt = merge_adapter(tmp_path / "base", tmp_path / "adapter")
    in_place = merge_lora(peft_model)
    assert rebuilt.config.moe == in_place.config.moe and rebuilt.config.conversation_template == "plain"
    state, expected = rebuilt.state_dict(), in_place.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)

    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter")


def test_merged_experts_run_on_grouped_gemms_again(moe_vlm):
    peft_model = apply_lora(moe_vlm, EXPERTS)
    blocks = [m for m in moe_vlm.modules() if isinstance(m, SparseMoeBlock)]
    assert all(b.experts.layout is None for b in blocks), "adapted experts: the loop path"
    merge_lora(peft_model)
    assert all(b.experts.layout == "gated" for b in blocks)


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"target_modules": (r"\.nothing_like_this$",)}, "lora.target_modules", "matches no module"),
        ({"target_modules": (r"\.router$",)}, "lora.target_modules", "not an nn.Linear; train routers fully"),
        ({"full_modules": (r"^nowhere$",)}, "lora.full_modules", "matches no module"),
        ({"full_modules": (r"\.experts$",)}, "lora.full_modules", "overlaps the adapter target"),
        ({"r": 0}, "lora.r", "must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(moe_vlm, settings, key, message):
    bad = LoraSettings(**{**EXPERTS.__dict__, **settings})
    with pytest.raises(ConfigError, match=f"^{key}: .*{message}") as err:
        apply_lora(moe_vlm, bad)
    assert "\n" not in str(err.value)


def test_targets_outside_the_stages_trainable_set_are_refused(moe_vlm):
    only_ffn = {n for n, _ in moe_vlm.named_parameters() if ".mlp." in n}
    routers_only = LoraSettings(**{**EXPERTS.__dict__, "full_modules": (r"\.router$",)})
    targets, full = resolve_targets(moe_vlm, routers_only, only_ffn)
    assert len(targets) == 2 * 4 * 3 + 2 * 3 and len(full) == 2
    with pytest.raises(
        ConfigError, match=r"^lora\.full_modules: projector is outside the stage's trainable set"
    ):
        resolve_targets(moe_vlm, EXPERTS, only_ffn)


def _conf_settings(name: str) -> LoraSettings:
    return LoraSettings.from_config(OmegaConf.load(CONF_DIR / "lora" / f"{name}.yaml"))


def test_stage2_lm_preset_adapts_every_decoder_linear_and_trains_the_projector(tiny_vlm):
    apply_lora(tiny_vlm, _conf_settings("lm"))
    trainable = {n for n, p in tiny_vlm.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[0] for n in trainable} == {"projector", "language_model"}
    assert not any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in trainable)
    _train(tiny_vlm)  # the adapted model trains


@pytest.mark.parametrize("preset", ["lm", "experts"])
def test_presets_fit_phi_names_too(preset):
    """Phi (the Phi-2 recipes) names its linears fc1/fc2 and dense: the presets' patterns cover them."""
    torch.manual_seed(0)
    config = MoELlavaConfig(
        vision_config=tiny_vision_config(), text_config=tiny_phi_config(), image_token_id=IMAGE_TOKEN_ID
    )
    model = MoELlavaForCausalLM(config)
    model.upcycle(num_experts=4, top_k=2, layers="sparse")
    targets, full = resolve_targets(model, _conf_settings(preset))
    kinds = {name.rsplit(".", 1)[-1] for name in targets}
    assert kinds == (
        {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"} if preset == "lm" else {"fc1", "fc2"}
    )
    assert all(name.startswith("language_model.") for name in targets), (
        "the CLIP tower's fc1/fc2 are not targets"
    )
    if preset == "experts":
        assert "language_model.model.layers.0.mlp.experts.3.fc2" in targets and len(full) == 1 + 2
