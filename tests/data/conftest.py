"""Fixtures of the data tests: real tokenizers (trained here), a real CLIP image processor, a tiny
ShapesWorld corpus and small image files of every kind (good, corrupt, not-an-image, ...)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from moe_llava.data.shapesworld import generate_shapesworld
from moe_llava.data.tokenizer import ensure_image_token, train_bpe_tokenizer

TINY_SHAPESWORLD = {
    "train_images": 60,
    "val_images": 12,
    "test_images": 24,
    "instruct_per_image": 2,
    "text_only_fraction": 0.2,
    "vqa_per_image": 2,
}

CORPUS = [
    "Is there a red circle in the image? Yes, there is a red circle in the top left.",
    "No, there is no blue square in the image.",
    "What colour is the star? The star is yellow. How many objects are there? There are three objects.",
    "A picture of a green triangle at the bottom and a purple cross on the left.",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 20


@pytest.fixture(scope="session")
def tiny_shapesworld(tmp_path_factory) -> Path:
    """A tiny ShapesWorld corpus (generated once per session, ~0.5 s)."""
    out = tmp_path_factory.mktemp("shapesworld") / "sw"
    generate_shapesworld(out, TINY_SHAPESWORLD)
    return out


@pytest.fixture(scope="session")
def sw_tokenizer(tiny_shapesworld):
    """The ShapesWorld tokenizer, loaded like users do (AutoTokenizer): BOS added, EOS = </s>."""
    from moe_llava.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_shapesworld / "tokenizer")


@pytest.fixture(scope="session")
def phi_like_tokenizer(tmp_path_factory):
    """A Phi-2/GPT-2-like tokenizer: byte-level BPE, no BOS added, eos <|endoftext|>, no pad and no
    <image> until ensure_image_token adds them (as for a real backbone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("phi_like_tok")
    fast.save_pretrained(str(out))
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert ensure_image_token(loaded) == 1
    return loaded


@pytest.fixture(scope="session")
def bos_tokenizer(tmp_path_factory):
    """A freshly trained project tokenizer (BOS-adding) on a small corpus."""
    return train_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe_tok"), vocab_size=300)


@pytest.fixture(scope="session")
def clip_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """good.png (48x32), square.png, corrupt.png (truncated), notes.png (text), big.png (200x200),
    sub/ok.png, and a symlink escaping the folder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (48, 32), (200, 10, 10)).save(folder / "good.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "square.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(folder / "sub" / "ok.png")
    Image.new("RGB", (200, 200), (1, 2, 3)).save(folder / "big.png")
    noisy = Image.effect_noise((64, 64), 50).convert("RGB")
    noisy.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("these are not pixels\n")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "link.png").symlink_to(outside)
    return folder
