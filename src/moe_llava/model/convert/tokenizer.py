"""The tokenizer of a released checkpoint as a native ``transformers`` tokenizer, without its code.

* Phi-2: CodeGen's GPT-2 BPE files are native; they load as they are.
* Qwen-1 (``QWenTokenizer``, ``qwen.tiktoken``) and StableLM-2 (``Arcade100kTokenizer``,
  ``arcade100k.tiktoken``) are remote code around ``tiktoken``. Their vocabularies become a fast
  tokenizer through ``transformers``' own :class:`~transformers.convert_slow_tokenizer.TikTokenConverter`,
  with the special tokens at the ids those classes give them (constants of the reference's
  tokenizer modules, repeated here so that their code never runs) and the NFC normalisation both
  apply before encoding.

The ``<image>`` token is added on top (:func:`~moe_llava.data.tokenizer.ensure_image_token`), as
for every backbone here; the released vocabulary's ids are unchanged.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from moe_llava.errors import CheckpointError

# The pre-tokenisation regex of both tokenizers (tokenization_qwen.py, tokenization_arcade100k.py).
TIKTOKEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _qwen_special_tokens() -> dict[str, int]:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))]
    return {name: 151643 + i for i, name in enumerate(names)}


def _arcade_special_tokens() -> dict[str, int]:
    code = [
        "<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
        "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
        "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
    ]  # fmt: skip
    names = [
        "<|endoftext|>",
        *("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"),
        *code,
        "<|endofprompt|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|pause|>",
        *(f"<|reg{i}|>" for i in range(8)),
        "<|extra0|>",
    ]
    return {name: 100257 + i for i, name in enumerate(names)}


# tokenizer class -> (vocabulary file, special tokens, defaults of the released special-token map)
TIKTOKEN_TOKENIZERS: dict[str, tuple[str, Any, dict[str, str]]] = {
    "QWenTokenizer": (
        "qwen.tiktoken",
        _qwen_special_tokens,
        {"eos_token": "<|endoftext|>", "unk_token": "<|extra_0|>", "pad_token": "<|extra_0|>"},
    ),
    "Arcade100kTokenizer": (
        "arcade100k.tiktoken",
        _arcade_special_tokens,
        {"eos_token": "<|endoftext|>", "unk_token": "<|reg0|>", "pad_token": "<|reg0|>"},
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")  # fmt: skip
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"not valid JSON ({err})", file=file) from None
    return data if isinstance(data, dict) else {}


def tokenizer_class_of(folder: Path) -> str | None:
    """The tokenizer class a checkpoint folder declares (or implies by its vocabulary file)."""
    name = _read(folder / "tokenizer_config.json").get("tokenizer_class")
    if name in TIKTOKEN_TOKENIZERS:
        return name
    for cls, (vocab, _, _) in TIKTOKEN_TOKENIZERS.items():
        if (folder / vocab).is_file() and not (folder / "tokenizer.json").is_file():
            return cls
    return name


def load_released_tokenizer(folder: Path):
    """The folder's tokenizer as a ``transformers`` tokenizer (``<image>`` not yet added)."""
    from transformers import AutoTokenizer

    cls = tokenizer_class_of(folder)
    if cls in TIKTOKEN_TOKENIZERS:
        return tiktoken_to_fast(folder, cls)
    config = _read(folder / "tokenizer_config.json")
    if config.get("auto_map") and not (folder / "tokenizer.json").is_file() and cls not in (None, ""):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        if tokenizer_class_from_name(cls) is None:
            raise CheckpointError(
                f"field 'tokenizer_class': {cls!r} is remote code with no native conversion here",
                file=folder / "tokenizer_config.json",
            )
    import shutil
    import tempfile

    # From a copy of the tokenizer's own files: no config.json of another architecture to read,
    # and no code beside them.
    with tempfile.TemporaryDirectory() as tmp:
        for file in folder.iterdir():
            if file.is_file() and (file.name in TOKENIZER_FILES or file.suffix in (".txt", ".model")):
                shutil.copy2(file, tmp)
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"no loadable tokenizer ({err})", file=folder) from None


def tiktoken_to_fast(folder: Path, cls: str):
    """A ``PreTrainedTokenizerFast`` with the ids of the tiktoken tokenizer class ``cls``."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_name, specials_of, defaults = TIKTOKEN_TOKENIZERS[cls]
    vocab_file = folder / vocab_name
    if not vocab_file.is_file():
        raise CheckpointError(f"no {vocab_name}: the vocabulary of its {cls}", file=folder)
    specials = specials_of()

    class Converter(TikTokenConverter):
        def tokenizer(self) -> Tokenizer:
            vocab, merges = self.extract_vocab_merges_from_model(self.vocab_file)
            collisions = sorted(set(vocab.values()) & set(specials.values()))
            if collisions:
                raise CheckpointError(
                    f"holds ranks {collisions[:3]} where {cls} puts its special tokens", file=vocab_file
                )
            vocab.update(specials)  # the classes number them from a fixed id, not from len(vocab)
            tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False))
            tokenizer.model.ignore_merges = True  # tiktoken's rule: a whole word in the vocab is one token
            return tokenizer

    try:
        backend = Converter(
            vocab_file=str(vocab_file), pattern=TIKTOKEN_PATTERN, extra_special_tokens=list(specials)
        ).converted()
    except (ValueError, base64.binascii.Error) as err:
        raise CheckpointError(f"not a tiktoken vocabulary ({err})", file=vocab_file) from None
    backend.normalizer = normalizers.NFC()  # both classes encode unicodedata.normalize("NFC", text)
    config = _read(folder / "tokenizer_config.json")
    special_map = _read(folder / "special_tokens_map.json")
    kwargs = {}
    for key in _SPECIAL_KEYS:
        value = _content(special_map.get(key)) or _content(config.get(key)) or defaults.get(key)
        if value is not None:
            if value not in specials:
                raise CheckpointError(
                    f"field {key!r}: {value!r} is not one of {cls}'s special tokens",
                    file=folder / "special_tokens_map.json",
                )
            kwargs[key] = value
    max_length = config.get("model_max_length")
    if isinstance(max_length, int) and max_length < 10**9:
        kwargs["model_max_length"] = max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side=config.get("padding_side", "right"),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def write_tiktoken(tokenizer, file: Path, specials: dict[str, int]) -> None:
    """The tiktoken vocabulary (base64 bytes and rank per line) of a fast tokenizer converted above."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        if token in specials:
            continue
        raw = bytes(byte_decoder[ch] for ch in token)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    file.write_text("".join(lines), encoding="utf-8")


def tiktoken_class_of(tokenizer) -> str | None:
    """The tiktoken tokenizer class whose special tokens ``tokenizer`` has, at their ids."""
    vocab = tokenizer.get_vocab()
    for cls, (_, specials_of, _) in TIKTOKEN_TOKENIZERS.items():
        if all(vocab.get(token) == i for token, i in specials_of().items()):
            return cls
    return None
