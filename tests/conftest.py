"""Shared fixtures: tiny real `transformers` models built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import os
import struct
import zlib

# Tests never reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ... and send no usage telemetry (MLflow's, and the Prefect and DVC processes they start).
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, PhiConfig, Qwen2Config

from moe_llava.model import MoELlavaConfig, MoELlavaForCausalLM

VOCAB = 96


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**values, **overrides})


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return Qwen2Config(**{**values, **overrides})


def tiny_phi_config(**overrides) -> PhiConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_act="gelu_new",
    )
    return PhiConfig(**{**values, **overrides})


def tiny_vision_values(**overrides) -> dict:
    """The tiny vision tower's sizes (any tower class: CLIP, SigLIP, a released checkpoint's copy)."""
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,  # 16 image tokens
    )
    return {**values, **overrides}


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    return CLIPVisionConfig(**tiny_vision_values(**overrides))


IMAGE_TOKEN_ID = VOCAB - 1


@pytest.fixture
def tiny_vlm() -> MoELlavaForCausalLM:
    torch.manual_seed(0)
    config = MoELlavaConfig(
        vision_config=tiny_vision_config(), text_config=tiny_llama_config(), image_token_id=IMAGE_TOKEN_ID
    )
    return MoELlavaForCausalLM(config).eval()


def multimodal_batch(model: MoELlavaForCausalLM, batch: int = 2, text_len: int = 7, seed: int = 0) -> dict:
    """One image per sample, placed after a BOS token, followed by random text."""
    g = torch.Generator().manual_seed(seed)
    n = model.num_image_tokens
    image_id = model.config.image_token_id
    text = torch.randint(3, image_id, (batch, text_len), generator=g)
    input_ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), image_id), text], dim=1
    )
    size = model.config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of ``width`` x ``height``: a few kB on disk, ``3 * width * height``
    bytes once decoded to RGB (a decompression bomb). Written row by row, never whole in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + the row's bits, all black
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# tests/lmms need the lmms-eval extra: `make test` runs them in .venv-lmms (make setup-lmms).
collect_ignore = [] if importlib.util.find_spec("lmms_eval") else ["lmms"]
