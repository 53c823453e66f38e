"""Collator (padding both sides, masks, pixel order) and the modality-grouped batch sampler."""

from __future__ import annotations

import pytest
import torch

from moe_llava.constants import IGNORE_INDEX
from moe_llava.data.collator import LlavaCollator
from moe_llava.data.dataset import LlavaDataset
from moe_llava.data.loader import build_dataloader
from moe_llava.data.sampler import ModalityGroupedBatchSampler

PAD, IMG = 0, 9


def feature(ids, labels=None, n_images=0, fill=0.0, fid="x"):
    pv = torch.full((n_images, 3, 4, 4), fill) if n_images else None
    return {
        "id": fid,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels if labels is not None else ids),
        "pixel_values": pv,
    }


FEATURES = [
    feature(
        [1, IMG, IMG, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 6], n_images=1, fill=1.0, fid="a"
    ),
    feature([1, 7], [IGNORE_INDEX, 7], fid="b"),
    feature([1, IMG, IMG, IMG, IMG, 8], [IGNORE_INDEX] * 5 + [8], n_images=2, fill=2.0, fid="c"),
]


def test_right_padding():
    batch = LlavaCollator(PAD, IMG, num_image_tokens=2)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_mask"}
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, 6, 0], [1, 7, 0, 0, 0, 0], [1, 9, 9, 9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 4
    assert batch["image_mask"].dtype == torch.bool
    assert batch["image_mask"].tolist()[0] == [False, True, True, False, False, False]
    assert batch["image_mask"].sum() == 6
    # images in order of appearance: sample a's one image, then sample c's two
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long


def test_left_padding_for_generation_and_ids():
    batch = LlavaCollator(PAD, IMG, padding_side="left", return_ids=True)(FEATURES)
    assert batch["input_ids"].tolist()[1] == [0, 0, 0, 0, 1, 7]
    assert batch["attention_mask"].tolist()[0] == [0, 1, 1, 1, 1, 1]
    assert batch["image_mask"].tolist()[0] == [False, False, True, True, False, False]
    assert batch["labels"][0, 0] == IGNORE_INDEX
    assert batch["ids"] == ["a", "b", "c"]
    # every row ends with its last real token (what generation continues from)
    assert batch["input_ids"][:, -1].tolist() == [6, 7, 8]


def test_text_only_batch_has_no_pixels_and_pad_to_multiple():
    batch = LlavaCollator(PAD, IMG, pad_to_multiple_of=8)([FEATURES[1], FEATURES[1]])
    assert batch["pixel_values"] is None
    assert batch["input_ids"].shape == (2, 8) and not batch["image_mask"].any()


def test_image_token_count_is_checked():
    with pytest.raises(ValueError, match="3 image tokens for 1 image"):
        LlavaCollator(PAD, IMG, num_image_tokens=2)([feature([IMG, IMG, IMG], n_images=1)])
    with pytest.raises(ValueError, match="padding_side"):
        LlavaCollator(PAD, IMG, padding_side="middle")


def _sampler(has_image, **kw):
    lengths = [(i * 37) % 50 for i in range(len(has_image))]
    return ModalityGroupedBatchSampler(has_image, lengths, 4, **kw)


HAS_IMAGE = [i % 3 != 0 for i in range(50)]  # 33 image + 17 text samples


def test_batches_are_single_modality_and_cover_everything_once():
    sampler = _sampler(HAS_IMAGE, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9 + 5
    for batch in batches:
        assert len({HAS_IMAGE[i] for i in batch}) == 1
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(50))
    assert sum(len(b) < 4 for b in batches) == 2  # one partial batch per modality
    assert {HAS_IMAGE[b[0]] for b in batches[:6]} == {True, False}  # modalities interleave


def test_sampler_is_deterministic_per_epoch_and_drop_last():
    a, b = _sampler(HAS_IMAGE, seed=3), _sampler(HAS_IMAGE, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    dropped = _sampler(HAS_IMAGE, seed=3, drop_last=True)
    assert all(len(batch) == 4 for batch in dropped) and len(list(dropped)) == len(dropped) == 8 + 4


def test_resume_continues_an_epoch_in_its_order_then_whole_epochs():
    reference = _sampler(HAS_IMAGE, seed=3, num_replicas=2, rank=1)
    reference.set_epoch(2)
    epoch2 = list(reference)
    resumed = _sampler(HAS_IMAGE, seed=3, num_replicas=2, rank=1)
    resumed.resume(2, 3)
    assert len(resumed) == len(epoch2) == 7  # Lightning counts the whole epoch
    assert list(resumed) == epoch2[3:]
    assert list(resumed) == epoch2  # the next iteration is a whole epoch again
    with pytest.raises(ValueError, match=r"batches_done must be in \[0, 7\]"):
        resumed.resume(2, 8)


def test_length_grouping_sorts_within_megabatches():
    lengths = list(range(64))
    sampler = ModalityGroupedBatchSampler([True] * 64, lengths, 4, seed=0, megabatch_batches=4)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in sampler]
    unsorted = ModalityGroupedBatchSampler([True] * 64, None, 4, seed=0, megabatch_batches=4)
    unsorted_spreads = [max(b) - min(b) for b in unsorted]
    assert sum(spreads) < sum(unsorted_spreads) / 2


def test_sharding_across_ranks():
    shards = [list(_sampler(HAS_IMAGE, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    assert (
        len({len(s) for s in shards})
        == 1
        == len({len(_sampler(HAS_IMAGE, num_replicas=3, rank=r)) for r in range(3)})
    )
    assert len(shards[0]) == len(_sampler(HAS_IMAGE, num_replicas=3))
    covered = {i for shard in shards for batch in shard for i in batch}
    assert covered == set(range(50))


def test_dataloader_end_to_end(tiny_shapesworld, sw_tokenizer, clip_processor):
    ds = LlavaDataset(
        tiny_shapesworld / "instruct_train.json",
        sw_tokenizer,
        image_processor=clip_processor,
        image_folder=tiny_shapesworld / "images",
        num_image_tokens=16,
    )
    loader = build_dataloader(ds, 8, seed=0)
    n_images = 0
    for batch in loader:
        rows = batch["image_mask"].any(dim=1)
        assert rows.all() or not rows.any()  # single modality
        assert (batch["image_mask"] == (batch["input_ids"] == ds.image_token_id)).all()
        expected = int(batch["image_mask"].sum()) // 16
        got = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
        assert got == expected
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert (batch["labels"][batch["image_mask"]] == IGNORE_INDEX).all()
        n_images += got
    assert n_images == sum(ds.has_image)
