"""Conversation templates that build ``input_ids`` and ``labels`` *together*, segment by segment.

The reference implementation renders the whole conversation to one string, tokenizes it, and then
tries to recover where each answer starts by re-tokenizing pieces; when the counts disagree it
silently masks the whole sample (loss 0). Here the token sequence is the concatenation of
separately tokenized segments, each carrying its own "supervised" flag, so the label mask is
correct by construction: exactly the assistant answers and their end-of-turn token are supervised,
and a mismatch cannot happen. The same code builds generation prompts, so training and inference
see identical prompt tokens.

Templates:

* ``plain`` (stage 1): ``[bos] <image> caption \\n``; loss on ``caption\\n``; the human text other
  than its ``<image>`` placeholders is ignored (as in the reference).
* ``phi`` (aliases ``qwen``, ``stablelm``, ``chat``): the reference's template for Phi-2, Qwen and
  StableLM: ``{system} USER: <image>\\n{q} ASSISTANT: {a}<eos>USER: ...``; no BOS unless the
  tokenizer adds one itself.
* ``vicuna_v1``: ``<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...``; always starts with BOS.

Every ``<image>`` placeholder becomes ``num_image_tokens`` copies of the tokenizer's ``<image>`` id
(label ``IGNORE_INDEX``). User text can never inject special tokens: text is tokenized with
``split_special_tokens=True``, so a literal ``</s>`` in a record is plain text, not an EOS.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_llava.constants import IGNORE_INDEX, IMAGE_TOKEN
from moe_llava.data.conversation import GPT, HUMAN, Turn, parse_conversation
from moe_llava.errors import TemplateError

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class TokenizedSample:
    """Token ids and labels of one sample; ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    num_images: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def supervised_spans(self) -> list[list[int]]:
        """Maximal runs of supervised token ids (one per answer, end-of-turn token included)."""
        spans: list[list[int]] = []
        previous = False
        for label in self.labels:
            if label == IGNORE_INDEX:
                previous = False
                continue
            if not previous:
                spans.append([])
            spans[-1].append(label)
            previous = True
        return spans


class _Builder:
    """Accumulates (ids, supervised) segments."""

    def __init__(self, tokenizer: Any, num_image_tokens: int, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.num_images = 0

    def ids(self, ids: Sequence[int], supervised: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    def text(self, text: str, supervised: bool) -> None:
        for k, piece in enumerate(text.split(IMAGE_TOKEN)):
            if k > 0:
                self.image()
            if piece:
                self.ids(encode_text(self.tokenizer, piece), supervised)

    def image(self) -> None:
        self.ids([self.image_token_id] * self.num_image_tokens, False)
        self.num_images += 1

    def result(self) -> TokenizedSample:
        return TokenizedSample(self.input_ids, self.labels, self.num_images)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text: no special tokens added, special-token text not interpreted."""
    try:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    except TypeError:  # a tokenizer without split_special_tokens support
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_PREFIX_CACHE: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def tokenizer_prefix_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer itself puts in front of a text (e.g. ``[bos]``), possibly none."""
    try:
        cached = _PREFIX_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable (or unhashable): computed each time
        return _prefix_ids(tokenizer)
    if cached is None:
        _PREFIX_CACHE[tokenizer] = cached = _prefix_ids(tokenizer)
    return list(cached)


def _prefix_ids(tokenizer: Any) -> list[int]:
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def image_token_id_of(tokenizer: Any) -> int:
    """The id of ``<image>``; it must be a single added token of the tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (
        unk is not None and token_id == unk and getattr(tokenizer, "unk_token", None) != IMAGE_TOKEN
    ):
        raise TemplateError(
            f"the tokenizer has no {IMAGE_TOKEN} token; add it with "
            "moe_llava.data.tokenizer.ensure_image_token(tokenizer) (and resize the model's embeddings)"
        )
    return int(token_id)


@dataclass(frozen=True)
class ConversationTemplate:
    """Base class; subclasses implement :meth:`_build`."""

    name: str

    def encode(
        self,
        conversations: Any,
        tokenizer: Any,
        *,
        num_image_tokens: int = 1,
        image_token_id: int | None = None,
        add_generation_prompt: bool = False,
    ) -> TokenizedSample:
        """Tokenize a conversation; labels supervise only the assistant answers (+ end of turn).

        The conversation must follow the turn rules of :mod:`moe_llava.data.conversation`.

        With ``add_generation_prompt`` the conversation must end with a human turn; the result ends
        with the assistant prefix, ready for ``generate`` (all labels ``IGNORE_INDEX``).
        """
        if num_image_tokens < 1:
            raise TemplateError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        turns = parse_conversation(conversations, ending=HUMAN if add_generation_prompt else GPT)
        if image_token_id is None:
            image_token_id = image_token_id_of(tokenizer) if any(IMAGE_TOKEN in t.text for t in turns) else -1
        builder = _Builder(tokenizer, num_image_tokens, image_token_id)
        self._build(builder, turns, add_generation_prompt)
        sample = builder.result()
        if add_generation_prompt:  # a prompt is never trained on (earlier answers are context here)
            sample.labels = [IGNORE_INDEX] * len(sample.labels)
        return sample

    def end_of_turn_text(self, tokenizer: Any) -> str:
        """Text of the token(s) that close each supervised answer."""
        raise NotImplementedError

    def _build(self, b: _Builder, turns: list[Turn], generation: bool) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class PlainTemplate(ConversationTemplate):
    """Stage 1: ``[prefix] <image>... caption\\n``; loss on the caption and its newline."""

    name: str = "plain"
    end_of_caption: str = "\n"

    def end_of_turn_text(self, tokenizer: Any) -> str:
        return self.end_of_caption

    def _build(self, b: _Builder, turns: list[Turn], generation: bool) -> None:
        if len(turns) != (1 if generation else 2):
            raise TemplateError(
                "the plain template takes exactly one human turn (its <image>) and one caption",
                field="conversations",
            )
        b.ids(tokenizer_prefix_ids(b.tokenizer), False)
        n_images = turns[0].text.count(IMAGE_TOKEN)
        for _ in range(n_images):
            b.image()
        if not generation:
            b.text(turns[1].text + self.end_of_caption, True)


@dataclass(frozen=True)
class ChatTemplate(ConversationTemplate):
    """``{system}{sep}USER: {q}{sep}ASSISTANT: {a}<eot>USER: ...`` (the reference's SeparatorStyle.TWO).

    The end of turn is the tokenizer's EOS id, appended as an id (never re-tokenized from text).
    ``add_bos``: True always prepends BOS, False never, None copies what the tokenizer itself does.
    """

    name: str = "phi"
    system: str = DEFAULT_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    add_bos: bool | None = None
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def end_of_turn_text(self, tokenizer: Any) -> str:
        return tokenizer.eos_token

    def _prefix(self, tokenizer: Any) -> list[int]:
        if self.add_bos is None:
            return tokenizer_prefix_ids(tokenizer)
        if self.add_bos:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise TemplateError(f"template {self.name!r} needs a BOS token but the tokenizer has none")
            return [bos]
        return []

    def _build(self, b: _Builder, turns: list[Turn], generation: bool) -> None:
        eos = getattr(b.tokenizer, "eos_token_id", None)
        if eos is None:
            raise TemplateError(f"template {self.name!r} needs an EOS token but the tokenizer has none")
        b.ids(self._prefix(b.tokenizer), False)
        user, assistant = self.roles
        prompt = self.system + self.sep if self.system else ""
        for i in range(0, len(turns), 2):
            question = turns[i].text
            prompt += f"{user}: {question}{self.sep}{assistant}:"
            b.text(prompt, False)
            prompt = ""
            if i + 1 < len(turns):
                b.text(" " + turns[i + 1].text, True)
                b.ids([eos], True)


PLAIN = PlainTemplate()
PHI = ChatTemplate(name="phi", aliases=("qwen", "stablelm", "chat"))
VICUNA_V1 = ChatTemplate(name="vicuna_v1", add_bos=True, aliases=("vicuna",))

TEMPLATES: dict[str, ConversationTemplate] = {}
for _template in (PLAIN, PHI, VICUNA_V1):
    TEMPLATES[_template.name] = _template
    for _alias in getattr(_template, "aliases", ()):
        TEMPLATES[_alias] = _template


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """A template by name (``plain``, ``phi``/``qwen``/``stablelm``/``chat``, ``vicuna_v1``) or as is."""
    if isinstance(template, ConversationTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise TemplateError(
            f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}"
        ) from None


def render(template: str | ConversationTemplate, conversations: Any, tokenizer: Any, **kwargs: Any) -> str:
    """The text a template produces (image tokens collapsed to one ``<image>``), for inspection."""
    sample = get_template(template).encode(conversations, tokenizer, num_image_tokens=1, **kwargs)
    return tokenizer.decode(sample.input_ids, skip_special_tokens=False)
