"""The data policies beside quarantining: drop a leading assistant turn, truncate at the end of a turn.

Measured on a mix665k-like manifest (tests/llava_like.py) with the real recipes' budget (2048 tokens,
576 image tokens): the counts of docs/data.md's table are these tests' numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_llava.cli import main
from moe_llava.data.conversation import GPT, HUMAN, role_of
from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.manifest import read_manifest
from moe_llava.data.prepare import prepare_manifest
from moe_llava.data.templates import get_template
from moe_llava.data.validation import Validator
from moe_llava.errors import RejectedFractionError
from tests.llava_like import write_llava_like

REPO = Path(__file__).resolve().parents[2]
BUDGET = {"max_length": 2048, "num_image_tokens": 576}  # the paper recipes' (CLIP-336: 24 x 24 patches)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("llava")
    return root, write_llava_like(root)


def validator(tokenizer, root: Path, **policies) -> Validator:
    return Validator(
        image_folder=root / "images", tokenizer=tokenizer, template="phi", image_check="header",
        **BUDGET, **policies,
    )  # fmt: skip


def roles(record: dict) -> list[str]:
    return [role_of(t) for t in record["conversations"]]


POLICIES = {  # docs/data.md's rows: (overlength, leading_gpt)
    "reject / reject (quarantine)": ("reject", "reject"),
    "truncate / reject": ("truncate", "reject"),
    "truncate_turns / drop (llava_json's default)": ("truncate_turns", "drop"),
}


def measure(tokenizer, root: Path, tmp_path: Path, overlength: str, leading_gpt: str) -> dict:
    out = tmp_path / f"{overlength}-{leading_gpt}"
    try:
        prepare_manifest(
            root / "llava_v1_5_mix665k.json",
            out,
            validator(tokenizer, root, overlength=overlength, leading_gpt=leading_gpt),
            max_rejected_fraction=0.01,
        )
        passed = True
    except RejectedFractionError as err:
        assert str(out / "quarantine.jsonl") in str(err)  # the error names the quarantine file
        passed = False
    counts = json.loads((out / "counts.json").read_text())
    return {**counts, "passes": passed, "out": out}


def test_each_policy_on_mix665k_like_data_matches_docs(phi_like_tokenizer, llava, tmp_path):
    root, kinds = llava
    measured = {name: measure(phi_like_tokenizer, root, tmp_path, *p) for name, p in POLICIES.items()}
    quarantine = measured["reject / reject (quarantine)"]
    assert quarantine["reasons"] == {
        "not_starting_with_human": kinds["leading_gpt"],
        "too_long": kinds["long"],
    }
    assert not quarantine["passes"] and quarantine["rejected_fraction"] > 0.01
    tail = measured["truncate / reject"]
    assert tail["reasons"] == {"not_starting_with_human": kinds["leading_gpt"]} and not tail["passes"]
    reference = measured["truncate_turns / drop (llava_json's default)"]
    assert reference["rejected"] == 0 and reference["passes"]
    assert reference["fixed"] == {
        "dropped_leading_gpt": kinds["leading_gpt"],
        "truncated_turns": kinds["long"],
    }

    # docs/data.md states these numbers
    doc = (REPO / "docs" / "data.md").read_text()
    for name, m in measured.items():
        fixed = ", ".join(f"{k} {v}" for k, v in sorted(m["fixed"].items())) or "-"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["reasons"].items())) or "-"
        row = (
            f"| {name} | {m['kept']} | {fixed} | {m['rejected']} ({100 * m['rejected_fraction']:.1f}%) "
            f"| {reasons} | {'yes' if m['passes'] else 'no: RejectedFractionError'} |"
        )
        assert row in doc, f"docs/data.md should have the row\n{row}"
    assert f"{kinds['mix']} records, {kinds['text_only']} of them text-only" in doc


def test_truncate_turns_keeps_whole_exchanges_that_fit(phi_like_tokenizer, llava, tmp_path):
    root, kinds = llava
    result = prepare_manifest(
        root / "llava_v1_5_mix665k.json", tmp_path / "out",
        validator(phi_like_tokenizer, root, overlength="truncate_turns", leading_gpt="drop"),
    )  # fmt: skip
    source = {str(r["id"]): r for r in read_manifest(root / "llava_v1_5_mix665k.json")}
    kept = read_manifest(result.manifest)
    changed = [r for r in kept if r != source[str(r["id"])]]
    assert len(changed) == kinds["long"] + kinds["leading_gpt"]
    template = get_template("phi")
    for record in changed:
        original = source[str(record["id"])]["conversations"]
        turns = record["conversations"]
        assert roles(record)[0] == HUMAN and roles(record)[-1] == GPT  # whole exchanges
        if role_of(original[0]) == GPT:  # the reference's skip of a leading gpt turn
            assert turns == original[1:]
            continue
        assert turns == original[: len(turns)] and len(turns) < len(original)  # a prefix, cut at a turn end
        length = len(template.encode(turns, phi_like_tokenizer, num_image_tokens=576))
        longer = len(template.encode(original[: len(turns) + 2], phi_like_tokenizer, num_image_tokens=576))
        assert length <= 2048 < longer  # the longest prefix that fits
    # every other record is kept as it is, integer ids and extra keys included
    assert all(r == source[str(r["id"])] for r in kept if r not in changed)
    assert any(isinstance(r["id"], int) for r in kept) and any("model" in r for r in kept)
    # and the prepared manifest trains: every record fits, none is dropped at load
    dataset = LlavaDataset(
        result.manifest, phi_like_tokenizer, template="phi", max_length=2048, num_image_tokens=576,
        image_processor=None if all("image" not in r for r in kept) else _processor(), image_folder=root / "images",
        overlength="truncate_turns",
    )  # fmt: skip
    assert len(dataset) == len(kept) and not dataset.rejected


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_a_first_exchange_over_the_budget_and_an_image_in_a_later_turn_stay_quarantined(
    phi_like_tokenizer, tmp_path
):
    """truncate_turns never keeps a record without its whole first exchange or without its image."""
    long = " ".join(["word"] * 3000)
    records = [
        {"id": "first-too-long", "conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "A."}]},
        {"id": "image-later", "image": "x.png", "conversations": [
            {"from": "human", "value": "Hi."}, {"from": "gpt", "value": long},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A."}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]  # fmt: skip
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "x.png")
    check = Validator(
        image_folder=tmp_path / "images", tokenizer=phi_like_tokenizer, template="phi", max_length=2048,
        num_image_tokens=576, overlength="truncate_turns",
    )  # fmt: skip
    verdicts = {r["id"]: check.check_record(r) for r in records}
    assert verdicts["first-too-long"].reasons == ["too_long"] and not verdicts["first-too-long"].fixes
    assert verdicts["image-later"].reasons == ["too_long"]
    assert verdicts["ok"].ok and verdicts["ok"].record is None


def test_the_cli_reports_repairs_with_counts(phi_like_tokenizer, llava, tmp_path, capsys):
    root, kinds = llava
    tokenizer_dir = tmp_path / "tok"
    phi_like_tokenizer.save_pretrained(str(tokenizer_dir))
    args = [
        str(root / "llava_v1_5_mix665k.json"), "--image-folder", str(root / "images"),
        "--tokenizer", str(tokenizer_dir), "--max-length", "2048", "--num-image-tokens", "576",
        "--image-check", "header", "--no-progress",
    ]  # fmt: skip
    assert main(["data", "validate", *args, "--overlength", "truncate_turns", "--leading-gpt", "drop"]) == 0
    out = capsys.readouterr().out
    assert f"kept after repair, dropped_leading_gpt: {kinds['leading_gpt']}" in out
    assert f"kept after repair, truncated_turns: {kinds['long']}" in out
    assert (
        main(["data", "prepare", *args, "--out-dir", str(tmp_path / "p"), "--max-rejected-fraction", "0.01"])
        == 2
    )
    err = capsys.readouterr().err
    assert re.search(r"4 of \d+ records rejected .*see .*quarantine\.jsonl", err)
