"""The LLaVA conversation rules, in one place: a record's ``conversations`` list parsed into turns.

A conversation is a list of ``{"from": role, "value": text}`` turns. The rules:

* roles are ``human`` (alias ``user``) and ``gpt`` (alias ``assistant``); each ``value`` is a string;
* the list is not empty, starts with a human turn and alternates human/gpt;
* it ends with an answer (training), with a question (a generation prompt) or either (a question
  file, whose records may carry their reference answer as a final gpt turn);
* ``<image>`` placeholders sit in human turns only (never in an answer).

Every rule broken is a :class:`ConversationIssue`: a reason code (the validation report's
:class:`~moe_llava.data.validation.Reason` values), the field (``conversations[i].from``...) and
a detail. :func:`parse_conversation` raises the first one as a :class:`ConversationError`;
:func:`conversation_issues` lists them all, with the checks only data validation makes (empty
answers, one ``<image>`` per image), for the quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.errors import ConversationError

HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}
ENDINGS = (GPT, HUMAN, None)  # what the last turn must be: an answer, a question, either

# the reason codes of the issues (values of moe_llava.data.validation.Reason)
MALFORMED_RECORD = "malformed_record"
EMPTY_CONVERSATION = "empty_conversation"
NOT_STARTING_WITH_HUMAN = "not_starting_with_human"
NOT_ALTERNATING = "not_alternating"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
EMPTY_ANSWER = "empty_answer"


@dataclass(frozen=True)
class Turn:
    role: str  # HUMAN or GPT (aliases resolved)
    text: str


@dataclass(frozen=True)
class ConversationIssue:
    reason: str
    field: str
    detail: str

    def error(self) -> ConversationError:
        return ConversationError(self.detail, field=self.field, reason=self.reason)


def role_of(turn: Any) -> str | None:
    """The canonical role of a raw turn (``human`` / ``gpt``); None when it is not a valid turn's."""
    return ROLE_ALIASES.get(turn.get("from")) if isinstance(turn, dict) else None


def parse_conversation(conversations: Any, *, ending: str | None = GPT) -> list[Turn]:
    """The turns of a valid conversation; raises :class:`ConversationError` at the first broken rule.

    ``ending``: the last turn must be an answer (``"gpt"``), a question (``"human"``) or either (None).
    """
    turns, issues = read_turns(conversations)
    if not issues:
        issues = [*order_issues(turns, ending=ending), *answer_issues(turns)]
    if issues:
        raise issues[0].error()
    return turns


def conversation_issues(
    conversations: Any, *, num_images: int | None = None
) -> tuple[list[Turn] | None, list[ConversationIssue]]:
    """Every broken rule of a training conversation (turns: None when they cannot be read), plus the
    data checks: no empty answer and, given ``num_images``, one ``<image>`` per image."""
    turns, issues = read_turns(conversations)
    if issues:
        return None, issues
    issues = [
        *order_issues(turns, ending=GPT),
        *answer_issues(turns, allow_empty=False),
        *placeholder_issues(turns, num_images),
    ]
    return turns, issues


def read_turns(conversations: Any) -> tuple[list[Turn], list[ConversationIssue]]:
    """The turns, or an issue for the list itself or for each malformed turn."""
    if not isinstance(conversations, list):
        got = type(conversations).__name__
        return [], [
            ConversationIssue(MALFORMED_RECORD, "conversations", f"must be a list of turns, got {got}")
        ]
    if not conversations:
        return [], [
            ConversationIssue(EMPTY_CONVERSATION, "conversations", "the conversation is empty (no turns)")
        ]
    turns: list[Turn] = []
    issues: list[ConversationIssue] = []
    for i, turn in enumerate(conversations):
        found = _turn_issues(turn, f"conversations[{i}]")
        if found:
            issues += found
        else:
            turns.append(Turn(ROLE_ALIASES[turn["from"]], turn["value"]))
    return turns, issues


def _turn_issues(turn: Any, field: str) -> list[ConversationIssue]:
    if not isinstance(turn, dict):
        detail = f"a turn must be an object with 'from' and 'value', got {type(turn).__name__}"
        return [ConversationIssue(MALFORMED_RECORD, field, detail)]
    issues = []
    if turn.get("from") not in ROLE_ALIASES:
        detail = f"unknown role {turn.get('from')!r} (expected one of {sorted(ROLE_ALIASES)})"
        issues.append(ConversationIssue(MALFORMED_RECORD, f"{field}.from", detail))
    if not isinstance(turn.get("value"), str):
        got = type(turn.get("value")).__name__
        issues.append(
            ConversationIssue(MALFORMED_RECORD, f"{field}.value", f"turn text must be a string, got {got}")
        )
    return issues


def order_issues(turns: list[Turn], *, ending: str | None = GPT) -> list[ConversationIssue]:
    """The first break of the turn order (at most one issue): human first, alternating, ``ending``."""
    if ending not in ENDINGS:
        raise ValueError(f"ending must be one of {ENDINGS}, got {ending!r}")
    if turns[0].role != HUMAN:
        detail = f"the conversation must start with a human turn; the first turn is from {turns[0].role!r}"
        return [ConversationIssue(NOT_STARTING_WITH_HUMAN, "conversations[0].from", detail)]
    for i, turn in enumerate(turns):
        if turn.role != (HUMAN if i % 2 == 0 else GPT):
            detail = f"turns must alternate human/gpt; turn {i} repeats {turn.role!r}"
            return [ConversationIssue(NOT_ALTERNATING, f"conversations[{i}].from", detail)]
    last = f"conversations[{len(turns) - 1}]"
    if ending == GPT and turns[-1].role != GPT:
        return [
            ConversationIssue(NOT_ALTERNATING, last, "the conversation ends with an unanswered human turn")
        ]
    if ending == HUMAN and turns[-1].role != HUMAN:
        return [ConversationIssue(NOT_ALTERNATING, last, "a generation prompt must end with a human turn")]
    return []


def answer_issues(turns: list[Turn], *, allow_empty: bool = True) -> list[ConversationIssue]:
    """An issue for each answer with an ``<image>`` placeholder (or, unless ``allow_empty``, blank)."""
    issues = []
    for i, turn in enumerate(turns):
        if turn.role != GPT:
            continue
        if not allow_empty and not turn.text.strip():
            issues.append(
                ConversationIssue(EMPTY_ANSWER, f"conversations[{i}].value", "the assistant answer is empty")
            )
        if IMAGE_TOKEN in turn.text:
            detail = f"{IMAGE_TOKEN} placeholder outside a human turn (in an assistant answer)"
            issues.append(ConversationIssue(IMAGE_PLACEHOLDER_MISMATCH, f"conversations[{i}].value", detail))
    return issues


def placeholder_issues(turns: list[Turn], num_images: int | None) -> list[ConversationIssue]:
    """An issue when the human turns' ``<image>`` placeholders are not one per image."""
    placeholders = sum(turn.text.count(IMAGE_TOKEN) for turn in turns if turn.role == HUMAN)
    if num_images is None or placeholders == num_images:
        return []
    detail = f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s)"
    return [ConversationIssue(IMAGE_PLACEHOLDER_MISMATCH, "conversations", detail)]
