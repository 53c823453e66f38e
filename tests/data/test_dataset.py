"""LlavaDataset: real tokenizer + real CLIP image processor; aspect handling; run-time robustness."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from moe_llava.constants import IGNORE_INDEX
from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.images import processor_mean_color
from moe_llava.errors import DataError

CONV = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]


def _records():
    return [
        {"id": "wide", "image": "good.png", "conversations": CONV},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        },
        {"id": "square", "image": "square.png", "conversations": CONV},
    ]


def test_items_follow_the_batch_contract(image_folder, sw_tokenizer, clip_processor):
    ds = LlavaDataset(
        _records(),
        sw_tokenizer,
        image_processor=clip_processor,
        image_folder=image_folder,
        num_image_tokens=7,
    )
    assert len(ds) == 3 and ds.has_image == [True, False, True]
    item = ds[0]
    assert item["id"] == "wide" and item["num_images"] == 1
    assert item["pixel_values"].shape == (1, 3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    image_id = sw_tokenizer.convert_tokens_to_ids("<image>")
    assert int((item["input_ids"] == image_id).sum()) == 7
    supervised = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert sw_tokenizer.decode(supervised) == " Red.</s>"
    assert ds[1]["pixel_values"] is None


def test_pad_uses_the_processor_mean_and_crop_centre_crops(tmp_path, sw_tokenizer, clip_processor):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # 64x32: left half red, right half blue
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))
    img.save(folder / "wide.png")
    records = [{"id": "w", "image": "wide.png", "conversations": CONV}]
    common = dict(image_processor=clip_processor, image_folder=folder, num_image_tokens=2)
    padded = LlavaDataset(records, sw_tokenizer, image_aspect="pad", **common)[0]["pixel_values"][0]
    cropped = LlavaDataset(records, sw_tokenizer, image_aspect="crop", **common)[0]["pixel_values"][0]
    mean = torch.tensor(clip_processor.image_mean).view(3, 1)
    std = torch.tensor(clip_processor.image_std).view(3, 1)
    # pad: top and bottom rows are the mean colour, i.e. ~0 after normalisation
    pad_rgb = torch.tensor(processor_mean_color(clip_processor), dtype=torch.float32).view(3, 1) / 255
    assert torch.allclose(padded[:, 0, :], ((pad_rgb - mean) / std).expand(3, 32), atol=0.02)
    assert padded[:, 0, :].abs().max() < 0.02
    # the middle keeps both halves (nothing cropped away)
    assert padded[0, 16, 2] > 1.5 and padded[2, 16, 29] > 1.5
    # crop: the centre 32x32 straddles the red/blue border, no padding rows
    assert cropped[0, 0, 2] > 1.5 and cropped[2, 0, 29] > 1.5
    custom = LlavaDataset(records, sw_tokenizer, image_aspect="pad", pad_color=(255, 255, 255), **common)[0][
        "pixel_values"
    ][0]
    assert custom[:, 0, :].min() > 1.5  # white padding


def test_invalid_records_fail_construction_or_are_skipped_loudly(
    image_folder, sw_tokenizer, clip_processor, caplog
):
    records = [*_records(), {"id": "bad", "conversations": []}, {"id": "wide", "conversations": CONV[::-1]}]
    kwargs = dict(image_processor=clip_processor, image_folder=image_folder)
    with pytest.raises(
        DataError, match=r"<records>: 2 invalid record\(s\) \(bad: empty_conversation; wide: "
    ) as err:
        LlavaDataset(records, sw_tokenizer, **kwargs)
    assert "moe-llava data prepare" in str(err.value)
    with caplog.at_level(logging.WARNING):
        ds = LlavaDataset(records, sw_tokenizer, strict=False, **kwargs)
    assert len(ds) == 3 and [r for r, _ in ds.rejected] == ["bad", "wide"]
    assert "skipping 2 invalid record(s)" in caplog.text
    with pytest.raises(DataError, match="no image_processor"):
        LlavaDataset(_records(), sw_tokenizer, image_folder=image_folder)


def test_a_bad_record_at_run_time_never_crashes_the_epoch(image_folder, sw_tokenizer, clip_processor, caplog):
    ds = LlavaDataset(
        _records(), sw_tokenizer, image_processor=clip_processor, image_folder=image_folder, max_length=64
    )
    (image_folder / "good.png").write_bytes(b"garbage")  # corrupted after preparation
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["id"] == "text"  # the next record stands in
    assert ds.failures == [("wide", "not_an_image")]
    assert "record 'wide' unusable at run time" in caplog.text
    (image_folder / "square.png").unlink()
    assert ds[2]["id"] == "text"  # square fails, wraps around to wide (fails too), then text
    assert ds.failures[-2:] == [("square", "missing_image"), ("wide", "not_an_image")]
    # too long at run time (e.g. a smaller max_length than the one prepared with) also falls back
    short = LlavaDataset(_records()[1:2] * 1, sw_tokenizer, max_length=3)
    with pytest.raises(DataError, match="consecutive records failed"):
        short[0]


def test_truncate_policy(image_folder, sw_tokenizer, clip_processor):
    long = [
        {
            "id": "l",
            "conversations": [
                {"from": "human", "value": "Q?"},
                {"from": "gpt", "value": "a b c d e f g h i j k"},
            ],
        }
    ]
    full = LlavaDataset(long, sw_tokenizer, max_length=None)[0]
    cut = LlavaDataset(long, sw_tokenizer, max_length=len(full["input_ids"]) - 3, overlength="truncate")[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][:-3])
    assert (cut["labels"] != IGNORE_INDEX).any()


def test_generation_mode_reads_pope_files(tiny_shapesworld, sw_tokenizer, clip_processor):
    ds = LlavaDataset(
        tiny_shapesworld / "pope_adversarial.jsonl",
        sw_tokenizer,
        image_processor=clip_processor,
        image_folder=tiny_shapesworld / "images",
        num_image_tokens=4,
        generation=True,
    )
    item = ds[0]
    assert item["answer"] in ("Yes", "No") and item["id"].startswith("pope-adversarial-")
    assert (item["labels"] == IGNORE_INDEX).all()
    assert sw_tokenizer.decode(item["input_ids"]).endswith("single word or phrase. ASSISTANT:")
    # bare question files (no conversations) work too
    bare = [{"question_id": "q1", "image": "test/000000.png", "text": "Is there a red circle in the image?"}]
    item = LlavaDataset(
        bare,
        sw_tokenizer,
        image_processor=clip_processor,
        image_folder=tiny_shapesworld / "images",
        generation=True,
    )[0]
    assert item["id"] == "q1" and item["answer"] is None


def test_streams_the_shapesworld_manifest(tiny_shapesworld, sw_tokenizer, clip_processor):
    ds = LlavaDataset(
        tiny_shapesworld / "instruct_train.json",
        sw_tokenizer,
        image_processor=clip_processor,
        image_folder=tiny_shapesworld / "images",
        num_image_tokens=16,
        max_length=256,
    )
    assert len(ds) > 120 and 0 < ds.has_image.count(False) < len(ds)
    assert ds.record(0)["id"] == "inst-train-000000-0"
    lengths = [len(ds[i]["input_ids"]) for i in range(0, len(ds), 7)]
    assert max(lengths) <= 256


def test_builders_from_the_hydra_data_config(tiny_shapesworld, clip_processor):
    from pathlib import Path

    from omegaconf import OmegaConf

    from moe_llava.data.config import dataset_from_config, eval_dataset_from_config, tokenizer_from_config
    from moe_llava.data.loader import build_dataloader

    cfg = OmegaConf.create(
        {"data": OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/data/shapesworld.yaml")}
    )
    cfg.data.root = str(tiny_shapesworld)
    tok = tokenizer_from_config(cfg.data)
    common = dict(tokenizer=tok, image_processor=clip_processor, num_image_tokens=8)
    stage1 = dataset_from_config(cfg.data, "stage1", **common)
    assert stage1.template.name == "plain" and stage1.transform.aspect == "crop"
    assert stage1.record(0)["id"] == "cap-train-000000"
    stage2_val = dataset_from_config(cfg.data, "stage2", split="val", **common)
    assert stage2_val.template.name == "phi" and stage2_val.transform.aspect == "pad"
    pope = eval_dataset_from_config(cfg.data, cfg.data.eval.pope.popular, **common)
    assert pope.generation and pope[0]["answer"] in ("Yes", "No")
    loader = build_dataloader(
        pope, 4, shuffle=False, group_by_modality=False, padding_side="left", return_ids=True
    )
    batch = next(iter(loader))
    assert batch["ids"] == [f"pope-popular-{i:05d}" for i in range(4)] and len(batch["answers"]) == 4
    assert (
        batch["input_ids"][:, -1] == batch["input_ids"][0, -1]
    ).all()  # all prompts end alike (left padded)
    with pytest.raises(ValueError, match="no stage 'stage9'"):
        dataset_from_config(cfg.data, "stage9", **common)
