"""Data preparation: cleaned manifest + quarantine + counts; loud failure above the threshold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_llava.cli import main
from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.manifest import read_manifest, write_manifest
from moe_llava.data.prepare import prepare_manifest
from moe_llava.data.validation import Validator
from moe_llava.errors import DataError, RejectedFractionError


def _records(n_good: int, bad: list[dict]) -> list[dict]:
    good = [
        {
            "id": f"g{i}",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": f"A{i}."}],
        }
        for i in range(n_good)
    ]
    return good[: n_good // 2] + bad + good[n_good // 2 :]


BAD = [
    {
        "id": "b-missing",
        "image": "gone.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
    },
    {"id": "b-empty", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": ""}]},
    {
        "id": "b-corrupt",
        "image": "corrupt.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
    },
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_prepare_keeps_valid_quarantines_the_rest(tmp_path, image_folder, sw_tokenizer, suffix):
    records = _records(40, BAD)
    src = tmp_path / f"raw{suffix}"
    write_manifest(src, records)
    validator = Validator(
        image_folder=image_folder, tokenizer=sw_tokenizer, template="phi", max_length=256, num_image_tokens=4
    )
    result = prepare_manifest(src, tmp_path / "out", validator, max_rejected_fraction=0.1)
    assert result.manifest.name == f"manifest{suffix}"
    kept = read_manifest(result.manifest)
    quarantined = read_manifest(result.quarantine)
    # nothing dropped silently: kept + quarantined == input, in order, records unchanged
    assert kept == [r for r in records if not r["id"].startswith("b-")]
    assert [q["id"] for q in quarantined] == ["b-missing", "b-empty", "b-corrupt"]
    assert [q["record"] for q in quarantined] == BAD
    assert [q["reasons"] for q in quarantined] == [["missing_image"], ["empty_answer"], ["unreadable_image"]]
    assert all(q["issues"][0]["detail"] and q["line"] > 0 for q in quarantined)
    counts = json.loads(result.counts_file.read_text())
    assert counts["total"] == 43 and counts["kept"] == 40 and counts["rejected"] == 3
    assert counts["reasons"] == {"empty_answer": 1, "missing_image": 1, "unreadable_image": 1}
    assert counts["settings"]["template"] == "phi" and counts["settings"]["token_checks"]


def test_prepare_fails_loudly_above_threshold_but_writes_everything(tmp_path, image_folder):
    src = tmp_path / "raw.json"
    write_manifest(src, _records(10, BAD))
    with pytest.raises(
        RejectedFractionError, match=r"3 of 13 records rejected \(23\.08%\), above the threshold 5\.00%"
    ) as err:
        prepare_manifest(
            src, tmp_path / "out", Validator(image_folder=image_folder), max_rejected_fraction=0.05
        )
    assert "quarantine.jsonl" in str(err.value) and "raw.json" in str(err.value)
    assert len(read_manifest(tmp_path / "out" / "quarantine.jsonl")) == 3
    assert len(read_manifest(tmp_path / "out" / "manifest.json")) == 10
    # all rejected is always an error, whatever the threshold
    write_manifest(src, BAD)
    with pytest.raises(RejectedFractionError, match="all 3 records were rejected"):
        prepare_manifest(
            src, tmp_path / "out2", Validator(image_folder=image_folder), max_rejected_fraction=1.0
        )


def test_cli_prepare(tmp_path, image_folder, capsys):
    src = tmp_path / "raw.jsonl"
    write_manifest(src, _records(30, BAD[:1]))
    base = ["data", "prepare", str(src), "--image-folder", str(image_folder), "--no-progress"]
    assert main([*base, "--out-dir", str(tmp_path / "ok"), "--max-rejected-fraction", "0.1"]) == 0
    assert "31 record(s): 30 kept, 1 quarantined" in capsys.readouterr().out
    assert main([*base, "--out-dir", str(tmp_path / "strict"), "--max-rejected-fraction", "0"]) == 2
    assert "above the threshold" in capsys.readouterr().err


def test_prepare_stage_from_the_shapesworld_config(tiny_shapesworld, sw_tokenizer, tmp_path):
    """The generated corpus is clean under the project's own data config."""
    from omegaconf import OmegaConf

    from moe_llava.data.config import prepare_stage

    cfg = OmegaConf.create(
        {"data": OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/data/shapesworld.yaml")}
    )
    cfg.data.root = str(tiny_shapesworld)
    for stage in ("stage1", "stage2"):
        result = prepare_stage(cfg.data, stage, tmp_path / stage, tokenizer=sw_tokenizer, num_image_tokens=16)
        assert result.rejected == 0 and result.kept == result.total > 0


@pytest.mark.parametrize(("name", "text"), [("empty.json", "[]"), ("empty.jsonl", "\n\n")])
def test_an_empty_dataset_is_refused_naming_the_file(tmp_path, image_folder, sw_tokenizer, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the manifest has no records"):
        prepare_manifest(
            path, tmp_path / "out", Validator(image_folder=image_folder), max_rejected_fraction=1
        )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no usable record"):
        LlavaDataset(path, sw_tokenizer, image_folder=image_folder)
