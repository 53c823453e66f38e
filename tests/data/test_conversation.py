"""The one parser of LLaVA conversations: every rule, its reason code, field and wording."""

from __future__ import annotations

import pytest

from moe_llava.data.conversation import (
    GPT,
    HUMAN,
    Turn,
    conversation_issues,
    parse_conversation,
    role_of,
)
from moe_llava.data.validation import REASONS
from moe_llava.errors import ConversationError, TemplateError


def turn(role: str, value) -> dict:
    return {"from": role, "value": value}


QA = [turn("human", "<image>\nWhat is it?"), turn("gpt", "A red circle.")]


def test_turns_have_canonical_roles_and_texts():
    aliased = [turn("user", "Q1?"), turn("assistant", "A1."), turn("human", "Q2?"), turn("gpt", "A2.")]
    assert parse_conversation(aliased) == [
        Turn(HUMAN, "Q1?"),
        Turn(GPT, "A1."),
        Turn(HUMAN, "Q2?"),
        Turn(GPT, "A2."),
    ]
    assert parse_conversation(aliased[:3], ending=HUMAN)[-1] == Turn(HUMAN, "Q2?")  # a generation prompt
    assert (
        len(parse_conversation(aliased[:3], ending=None)) == len(parse_conversation(aliased, ending=None)) - 1
    )
    assert [role_of(t) for t in [*aliased[:2], turn("system", "x"), "not a turn"]] == [HUMAN, GPT, None, None]


# (conversation, ending, reason, field, words of the message)
BROKEN = [
    ({"from": "human"}, GPT, "malformed_record", "conversations", "must be a list of turns, got dict"),
    ([], GPT, "empty_conversation", "conversations", "the conversation is empty"),
    ([QA[0], "hi"], GPT, "malformed_record", "conversations[1]", "a turn must be an object"),
    ([turn("system", "x"), QA[1]], GPT, "malformed_record", "conversations[0].from", "unknown role 'system'"),
    (
        [turn("human", 3), QA[1]],
        GPT,
        "malformed_record",
        "conversations[0].value",
        "must be a string, got int",
    ),
    (QA[::-1], GPT, "not_starting_with_human", "conversations[0].from", "the first turn is from 'gpt'"),
    ([QA[0], *QA], GPT, "not_alternating", "conversations[1].from", "turn 1 repeats 'human'"),
    ([*QA, QA[0]], GPT, "not_alternating", "conversations[2]", "ends with an unanswered human turn"),
    (QA, HUMAN, "not_alternating", "conversations[1]", "a generation prompt must end with a human turn"),
    (
        [QA[0], turn("gpt", "see <image>")],
        None,
        "image_placeholder_mismatch",
        "conversations[1].value",
        "<image> placeholder outside a human turn",
    ),
]


@pytest.mark.parametrize(("conversation", "ending", "reason", "field", "words"), BROKEN)
def test_each_broken_rule_raises_its_reason_and_field(conversation, ending, reason, field, words):
    with pytest.raises(ConversationError) as err:
        parse_conversation(conversation, ending=ending)
    assert (err.value.reason, err.value.field) == (reason, field)
    assert str(err.value) == f"field {field!r}: {err.value.detail}" and words in err.value.detail
    assert isinstance(err.value, TemplateError) and reason in REASONS  # what templates and reports know


def test_the_first_broken_rule_is_raised():
    with pytest.raises(ConversationError) as err:
        parse_conversation([turn("system", 1), "hi"])
    assert err.value.field == "conversations[0].from"  # before its .value and the next turn
    with pytest.raises(ConversationError, match="first turn"):
        parse_conversation([QA[1], QA[1]])  # not starting with human, before not alternating
    with pytest.raises(ValueError, match="ending must be one of"):
        parse_conversation(QA, ending="answer")


def test_conversation_issues_lists_every_issue_with_the_data_checks():
    bad_turns = [turn("system", 1), "hi", QA[1]]
    turns, issues = conversation_issues(bad_turns)
    assert turns is None
    assert [(i.reason, i.field) for i in issues] == [
        ("malformed_record", "conversations[0].from"),
        ("malformed_record", "conversations[0].value"),
        ("malformed_record", "conversations[1]"),
    ]
    # a readable conversation: the order, then each answer, then the placeholder count
    conversation = [QA[0], QA[0], turn("gpt", " "), turn("gpt", "<image>")]
    turns, issues = conversation_issues(conversation, num_images=1)
    assert turns is not None and len(turns) == 4
    assert [(i.reason, i.field) for i in issues] == [
        ("not_alternating", "conversations[1].from"),
        ("empty_answer", "conversations[2].value"),
        ("image_placeholder_mismatch", "conversations[3].value"),
        ("image_placeholder_mismatch", "conversations"),
    ]
    assert issues[-1].detail == "2 <image> placeholder(s) for 1 image(s)"
    assert conversation_issues(QA, num_images=1) == (
        [Turn(HUMAN, QA[0]["value"]), Turn(GPT, QA[1]["value"])],
        [],
    )
    assert conversation_issues(QA)[1] == []  # no image count to check
    _, (issue,) = conversation_issues(QA, num_images=0)
    assert issue.detail == "1 <image> placeholder(s) for 0 image(s)"
    # parse_conversation takes empty answers (templates train on them; data validation rejects them)
    assert parse_conversation([QA[0], turn("gpt", "")])[-1] == Turn(GPT, "")
