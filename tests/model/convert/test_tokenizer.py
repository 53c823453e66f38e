"""Released tokenizers without their code: tiktoken vocabularies (Qwen-1, StableLM-2) become fast
tokenizers giving the ids tiktoken gives with the reference classes' settings; Phi's as they are."""

from __future__ import annotations

import unicodedata

import pytest
import tiktoken
from transformers import AutoTokenizer

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.model.convert import convert_released
from moe_llava.model.convert.tokenizer import TIKTOKEN_PATTERN, TIKTOKEN_TOKENIZERS, load_released_tokenizer
from tests.model.convert.released_layout import (
    MARKER,
    TOKENIZER_TEXTS,
    tiktoken_ranks,
    vision_config,
    write_released,
    write_tokenizer,
)

TEST_TEXT = (
    "USER: <image>\nIs there a red circle?  ASSISTANT: Yes.<|endoftext|> 12345 shapes, café "
    "cafe\u0301 (decomposed), tabs\tand\n\nnew lines, naïve Ünïcödé, 東京 🙂 <|im_start|>user"
)


@pytest.mark.parametrize(
    ("backbone", "cls"), [("qwen", "QWenTokenizer"), ("stablelm", "Arcade100kTokenizer")]
)
def test_tiktoken_vocabularies_give_the_original_ids(tmp_path, backbone, cls):
    write_tokenizer(tmp_path, backbone)
    tokenizer = load_released_tokenizer(tmp_path)
    _, specials_of, _ = TIKTOKEN_TOKENIZERS[cls]
    # what the reference class runs: tiktoken.Encoding over the same vocabulary, NFC first
    encoding = tiktoken.Encoding(
        name=cls,
        pat_str=TIKTOKEN_PATTERN,
        mergeable_ranks=tiktoken_ranks(TOKENIZER_TEXTS),
        special_tokens=specials_of(),
    )
    for text in [TEST_TEXT, *TOKENIZER_TEXTS]:
        expected = encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == expected
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == ("<|extra_0|>" if backbone == "qwen" else "<|reg0|>")
    assert tokenizer.convert_tokens_to_ids(tokenizer.pad_token) == (151646 if backbone == "qwen" else 100280)
    assert not (tmp_path / MARKER).exists()  # the shipped tokenizer code never ran


@pytest.mark.parametrize("backbone", ["phi", "qwen"])
def test_the_export_tokenizer_keeps_the_ids_and_adds_image(tmp_path, backbone):
    src, _ = write_released(tmp_path / "r", backbone)
    convert_released(src, tmp_path / "o", vision_config=vision_config("clip"))
    original = load_released_tokenizer(src)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "o"), trust_remote_code=False)
    text = TEST_TEXT.replace("<image>", "")
    assert (
        exported(text, add_special_tokens=False)["input_ids"]
        == original(text, add_special_tokens=False)["input_ids"]
    )
    image_id = exported.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = original.get_vocab()
    # a new id (the Phi stand-in, a tokenizer of this project's, already has the token)
    assert image_id == vocab[IMAGE_TOKEN] if IMAGE_TOKEN in vocab else image_id not in vocab.values()
    assert exported.convert_ids_to_tokens(image_id) == IMAGE_TOKEN
    assert not (src / MARKER).exists()
