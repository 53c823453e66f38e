"""MoELlavaForCausalLM: image splicing, losses, generation with a KV cache, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from moe_llava.constants import IGNORE_INDEX
from moe_llava.model import MoELlavaForCausalLM, SparseMoeBlock
from tests.conftest import multimodal_batch


def test_image_positions_take_projected_features(tiny_vlm):
    batch = multimodal_batch(tiny_vlm)
    embeds, image_mask = tiny_vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
    features = tiny_vlm.encode_images(batch["pixel_values"])
    assert features.shape == (2, tiny_vlm.num_image_tokens, tiny_vlm.config.text_config.hidden_size)
    torch.testing.assert_close(embeds[image_mask].view_as(features), features)
    text_embeds = tiny_vlm.get_input_embeddings()(batch["input_ids"][~image_mask])
    torch.testing.assert_close(embeds[~image_mask], text_embeds)


def test_vision_feature_layer_and_cls_drop(tiny_vlm):
    pixel_values = multimodal_batch(tiny_vlm)["pixel_values"]
    hidden = tiny_vlm.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == tiny_vlm.num_image_tokens + 1  # CLIP: CLS + patches
    torch.testing.assert_close(tiny_vlm.encode_images(pixel_values), tiny_vlm.projector(hidden[:, 1:]))


def test_image_token_count_mismatch_is_a_clear_error(tiny_vlm):
    batch = multimodal_batch(tiny_vlm)
    with pytest.raises(ValueError, match="image-token positions"):
        tiny_vlm(batch["input_ids"], batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="pixel_values is None"):
        tiny_vlm(batch["input_ids"])


def test_labels_at_image_positions_are_ignored_and_loss_parts_add_up(tiny_vlm):
    batch = multimodal_batch(tiny_vlm)
    image_mask = batch["input_ids"] == tiny_vlm.config.image_token_id
    labels = batch["input_ids"].clone()
    masked = labels.masked_fill(image_mask, IGNORE_INDEX)
    out = tiny_vlm(**batch, labels=labels)
    assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)
    torch.testing.assert_close(out.loss, tiny_vlm(**batch, labels=masked).loss)

    tiny_vlm.config.router_z_loss_coef = 0.001
    tiny_vlm.upcycle(num_experts=4, top_k=2, layers="sparse")
    out = tiny_vlm(**batch, labels=labels)
    assert out.aux_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss)
    stats = tiny_vlm.router_stats()
    assert list(stats) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    for layer_stats in stats.values():
        assert int(layer_stats.image_top1.sum()) == int(image_mask.sum())
        assert int(layer_stats.text_top1.sum()) == int((~image_mask).sum())


def test_output_is_the_libraries_causal_lm_output_with_every_field_of_the_lm(tiny_vlm):
    """Whatever the installed transformers calls the KV cache (`past_key_values`, later `cache`),
    the language model's output fields reach our output under the same names."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    batch = multimodal_batch(tiny_vlm)
    out = tiny_vlm(**batch, use_cache=True, output_hidden_states=True)
    assert isinstance(out, CausalLMOutputWithPast)
    embeds, _ = tiny_vlm.embed_inputs(batch["input_ids"], batch["pixel_values"])
    lm_out = tiny_vlm.language_model(
        inputs_embeds=embeds,
        attention_mask=batch.get("attention_mask"),
        use_cache=True,
        output_hidden_states=True,
    )
    assert set(lm_out.keys()) <= set(out.keys())
    cache_field = next(k for k in lm_out if k in ("cache", "past_key_values"))
    assert (
        type(out[cache_field]) is type(lm_out[cache_field])
        and out[cache_field].get_seq_length() == (batch["input_ids"].shape[1])
    )
    torch.testing.assert_close(out.logits, lm_out.logits)
    assert len(out.hidden_states) == len(lm_out.hidden_states)


def test_fully_masked_labels_give_zero_loss_with_graph(tiny_vlm):
    batch = multimodal_batch(tiny_vlm)
    out = tiny_vlm(**batch, labels=torch.full_like(batch["input_ids"], IGNORE_INDEX))
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_text_only_batch(tiny_vlm):
    input_ids = torch.randint(3, 90, (2, 5))
    out = tiny_vlm(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)


def test_generate_uses_kv_cache_and_matches_uncached(tiny_vlm):
    tiny_vlm.upcycle(num_experts=4, top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0)
    batch = multimodal_batch(tiny_vlm, batch=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    cached = tiny_vlm.generate(batch["input_ids"], batch["pixel_values"], use_cache=True, **kwargs)
    uncached = tiny_vlm.generate(batch["input_ids"], batch["pixel_values"], use_cache=False, **kwargs)
    assert cached.shape == (1, 6)
    assert torch.equal(cached, uncached)
    # Greedy continuation agrees with argmax of a full forward over prompt + generated tokens.
    full = torch.cat([batch["input_ids"], cached], dim=1)
    logits = tiny_vlm(full, batch["pixel_values"]).logits
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(logits[0, prompt_len - 1 : -1].argmax(-1), cached[0])


def test_save_pretrained_round_trip_keeps_moe_layout_logits_and_generations(tiny_vlm, tmp_path):
    tiny_vlm.upcycle(num_experts=4, top_k=2, layers="sparse", capacity_factor=1.5, eval_capacity_factor=2.0)
    with torch.no_grad():  # make experts differ so a wrong mapping would show
        for module in tiny_vlm.modules():
            if isinstance(module, SparseMoeBlock):
                for expert in module.experts:
                    expert.up_proj.weight.add_(torch.randn_like(expert.up_proj.weight) * 0.1)
    batch = multimodal_batch(tiny_vlm)
    tiny_vlm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))

    loaded = MoELlavaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe["layers"] == [0, 2] and loaded.config.moe["capacity_factor"] == 1.5
    assert sum(isinstance(m, SparseMoeBlock) for m in loaded.modules()) == 2
    for (name, a), (_, b) in zip(tiny_vlm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded(**batch).logits, tiny_vlm(**batch).logits, atol=0, rtol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(
        loaded.generate(batch["input_ids"], batch["pixel_values"], **kwargs),
        tiny_vlm.generate(batch["input_ids"], batch["pixel_values"], **kwargs),
    )


def test_auto_classes_load_the_export(tiny_vlm, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    tiny_vlm.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "MoELlavaConfig"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), MoELlavaForCausalLM)


def test_unused_vision_parameters_are_exactly_those_without_gradient(tiny_vlm):
    tiny_vlm.train()
    batch = multimodal_batch(tiny_vlm)
    tiny_vlm(**batch, labels=batch["input_ids"]).loss.backward()
    no_grad = {f"vision_tower.{n}" for n, p in tiny_vlm.vision_tower.named_parameters() if p.grad is None}
    assert no_grad == tiny_vlm.unused_vision_parameter_names()
    assert any("layers.1." in n for n in no_grad) and any("post_layernorm" in n for n in no_grad)


def test_text_only_training_batch_keeps_the_image_path_in_the_graph(tiny_vlm):
    tiny_vlm.train()
    input_ids = torch.randint(3, 90, (2, 5))
    out = tiny_vlm(input_ids, labels=input_ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in tiny_vlm.projector.parameters())
    tiny_vlm.eval()
    torch.testing.assert_close(tiny_vlm(input_ids, labels=input_ids).loss, out.loss)
