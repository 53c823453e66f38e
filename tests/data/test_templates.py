"""Conversation templates: label masks are exact by construction, for every template and tokenizer."""

from __future__ import annotations

import pytest

from moe_llava.constants import IGNORE_INDEX, IMAGE_TOKEN
from moe_llava.data.manifest import read_manifest
from moe_llava.data.templates import TEMPLATES, get_template, image_token_id_of, render
from moe_llava.errors import TemplateError

MULTI_TURN = [
    {"from": "human", "value": "<image>\nIs there a red circle in the image?"},
    {"from": "gpt", "value": "Yes, there is a red circle in the top left."},
    {
        "from": "human",
        "value": "What colour is the star?\nAnswer the question using a single word or phrase.",
    },
    {"from": "gpt", "value": "Yellow"},
    {"from": "user", "value": "And the </s> <s> <pad> tokens?"},  # special-token text is plain text
    {"from": "assistant", "value": "They are just text: </s>"},
]
CAPTION = [
    {"from": "human", "value": "<image>\nDescribe the image briefly."},
    {"from": "gpt", "value": "A picture of a green triangle at the bottom."},
]
TOKENIZERS = ["sw_tokenizer", "phi_like_tokenizer"]


def _check_exact(template_name, conversation, tokenizer, num_image_tokens=5):
    template = get_template(template_name)
    sample = template.encode(conversation, tokenizer, num_image_tokens=num_image_tokens)
    answers = [turn["value"] for turn in conversation[1::2]]
    spans = sample.supervised_spans()
    eot = template.end_of_turn_text(tokenizer)
    decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in spans]
    if template_name == "plain":
        assert decoded == [answers[0] + eot]
    else:
        # exactly the answers (after the single separating space) and their end-of-turn token
        assert decoded == [" " + answer + eot for answer in answers]
        assert [span[-1] for span in spans] == [tokenizer.eos_token_id] * len(answers)
    image_id = image_token_id_of(tokenizer)
    positions = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert len(positions) == num_image_tokens == positions[-1] - positions[0] + 1  # consecutive
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(sample.labels, sample.input_ids))
    assert len(sample.labels) == len(sample.input_ids)
    return sample


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("template_name", ["phi", "qwen", "stablelm", "vicuna_v1"])
def test_chat_templates_unmask_exactly_the_answers(request, template_name, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    sample = _check_exact(template_name, MULTI_TURN, tokenizer)
    # literal special-token text in user content never becomes a special id
    n_eos = sample.input_ids[1:].count(tokenizer.eos_token_id)  # [0] may be a BOS equal to EOS (Phi-2)
    assert n_eos == 3  # one per answer, none from the text "</s>"


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_plain_template_supervises_caption_and_newline(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    sample = _check_exact("plain", CAPTION, tokenizer)
    # plain drops the human text: only [prefix] + image tokens precede the caption
    prefix_len = sample.labels.index(next(label for label in sample.labels if label != IGNORE_INDEX))
    assert prefix_len in (5, 6)  # 5 image tokens (+ BOS for the BOS-adding tokenizer)


def test_bos_policy(sw_tokenizer, phi_like_tokenizer):
    # the project tokenizer adds <s> itself: every template starts with it
    for name in ("plain", "phi", "vicuna_v1"):
        ids = get_template(name).encode(CAPTION, sw_tokenizer, num_image_tokens=1).input_ids
        assert ids[0] == sw_tokenizer.bos_token_id
        assert ids.count(sw_tokenizer.bos_token_id) == 1
    # Phi-2-like: the phi template adds nothing, vicuna_v1 always starts with BOS
    phi_ids = get_template("phi").encode(CAPTION, phi_like_tokenizer).input_ids
    vic_ids = get_template("vicuna_v1").encode(CAPTION, phi_like_tokenizer).input_ids
    assert phi_ids[0] != phi_like_tokenizer.bos_token_id
    assert vic_ids[0] == phi_like_tokenizer.bos_token_id and vic_ids[1:] == phi_ids


def test_rendered_text_matches_the_reference_format(sw_tokenizer):
    text = render("phi", MULTI_TURN[:4], sw_tokenizer)
    assert text == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs there a red circle in the image? "
        "ASSISTANT: Yes, there is a red circle in the top left.</s>USER: What colour is the star?\n"
        "Answer the question using a single word or phrase. ASSISTANT: Yellow</s>"
    )


@pytest.mark.parametrize("template_name", ["plain", "phi", "vicuna_v1"])
def test_generation_prompt_is_the_training_prefix(sw_tokenizer, template_name):
    """Inference sees exactly the tokens training saw before the last answer."""
    conversation = CAPTION if template_name == "plain" else MULTI_TURN[:4]
    template = get_template(template_name)
    full = template.encode(conversation, sw_tokenizer, num_image_tokens=3)
    prompt = template.encode(conversation[:-1], sw_tokenizer, num_image_tokens=3, add_generation_prompt=True)
    assert full.input_ids[: len(prompt)] == prompt.input_ids
    assert all(label == IGNORE_INDEX for label in prompt.labels)
    assert full.labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after the prompt


def test_every_shapesworld_sample_is_supervised_exactly(tiny_shapesworld, sw_tokenizer):
    """No 'tokenization mismatch' is possible: on the whole corpus, the supervised tokens are the answers."""
    phi = get_template("phi")
    for name in ("instruct_train.json", "instruct_val.json"):
        for record in read_manifest(tiny_shapesworld / name):
            sample = phi.encode(record["conversations"], sw_tokenizer, num_image_tokens=4)
            answers = [turn["value"] for turn in record["conversations"][1::2]]
            decoded = [sw_tokenizer.decode(span) for span in sample.supervised_spans()]
            assert decoded == [f" {a}</s>" for a in answers], record["id"]
    plain = get_template("plain")
    for record in read_manifest(tiny_shapesworld / "captions_train.json"):
        sample = plain.encode(record["conversations"], sw_tokenizer, num_image_tokens=4)
        assert [sw_tokenizer.decode(s) for s in sample.supervised_spans()] == [
            record["conversations"][1]["value"] + "\n"
        ]


@pytest.mark.parametrize(
    ("template_name", "conversation", "message"),
    [
        ("plain", MULTI_TURN, "exactly one human turn"),
        ("phi", [], "empty"),
        ("phi", MULTI_TURN[1:3], "start with a human"),
        ("phi", MULTI_TURN[:3], "unanswered"),
        ("phi", [MULTI_TURN[0], MULTI_TURN[0], MULTI_TURN[1]], "alternate"),
        ("phi", [{"from": "system", "value": "x"}], "unknown role"),
        ("phi", [MULTI_TURN[0], {"from": "gpt", "value": "see <image>"}], "outside a human turn"),
    ],
)
def test_template_errors_name_the_field(sw_tokenizer, template_name, conversation, message):
    with pytest.raises(TemplateError, match=message):
        get_template(template_name).encode(conversation, sw_tokenizer)


def test_unknown_template_and_missing_image_token(sw_tokenizer, tmp_path):
    with pytest.raises(TemplateError, match="unknown conversation template 'nope'"):
        get_template("nope")
    assert {"plain", "phi", "qwen", "stablelm", "vicuna_v1"} <= set(TEMPLATES)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    no_image = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]")
    with pytest.raises(TemplateError, match=f"no {IMAGE_TOKEN} token"):
        get_template("phi").encode(CAPTION, no_image)
