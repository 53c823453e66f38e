"""Tokenizers: train a small byte-level BPE for the tiny model; prepare real backbones' tokenizers.

The trained tokenizer is a ``transformers`` fast tokenizer saved with ``save_pretrained``, loadable
with ``AutoTokenizer.from_pretrained(dir)``. Byte-level BPE round-trips any text exactly (decoding
the supervised label tokens gives back the answers verbatim) and never produces ``<unk>``.
Special tokens, with fixed ids: ``<pad>``=0, ``<s>``=1 (BOS, added in front of every encoded text),
``</s>``=2 (EOS, the end-of-turn token of the chat templates), ``<unk>``=3, ``<image>``=4.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moe_llava.constants import IMAGE_TOKEN

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> Any:
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` (saved if ``out_dir``).

    Deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=model_max_length,
        padding_side="right",
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def ensure_image_token(tokenizer: Any) -> int:
    """Make sure ``<image>`` is a special token of ``tokenizer`` (and it has a pad token).

    Returns the number of tokens added: when > 0 the model's embeddings must be resized
    (``model.resize_token_embeddings(len(tokenizer))``). Real backbones (Phi-2, Qwen, ...) need this;
    the ShapesWorld tokenizer already has ``<image>``.
    """
    added = 0
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        added += tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
        if IMAGE_TOKEN not in tokenizer.get_vocab():  # older API
            added += tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return added


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` + :func:`ensure_image_token` (local files only here).

    Code shipped with a tokenizer never runs: ``trust_remote_code`` is False unless a caller passes it
    (an explicit False, not the library's default None, which asks on an interactive terminal).
    """
    from transformers import AutoTokenizer

    kwargs.setdefault("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    ensure_image_token(tokenizer)
    return tokenizer
