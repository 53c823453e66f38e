"""ShapesWorld: deterministic bytes, disjoint splits, truthful text, POPE semantics, tokenizer, config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from moe_llava.cli import main
from moe_llava.data.manifest import read_manifest
from moe_llava.data.shapesworld import (
    COLOURS,
    POPE_SPLITS,
    SHAPES,
    ObjectStats,
    ShapesWorldConfig,
    all_objects,
    generate_shapesworld,
)
from moe_llava.data.shapesworld.pope import SceneRelations, relation_to_scene
from moe_llava.data.shapesworld.scene import ObjectPrior

from .conftest import TINY_SHAPESWORLD

REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def annotations(root: Path, split: str) -> dict[str, list[str]]:
    return {
        rec["image"]: [o["name"] for o in rec["objects"]]
        for rec in read_manifest(root / f"annotations_{split}.jsonl")
    }


def test_generation_is_byte_deterministic(tmp_path, tiny_shapesworld):
    again = tmp_path / "again"
    generate_shapesworld(again, TINY_SHAPESWORLD)
    first, second = tree_digest(tiny_shapesworld), tree_digest(again)
    assert first == second
    assert len(first) > 96 and "tokenizer/tokenizer.json" in first
    other = tmp_path / "other_seed"
    generate_shapesworld(other, {**TINY_SHAPESWORLD, "seed": 1})
    differing = {k for k in first if first[k] != tree_digest(other).get(k)}
    assert "images/train/000000.png" in differing and "pope_random.jsonl" in differing


def test_splits_share_no_image_and_manifests_stay_in_their_split(tiny_shapesworld):
    root = tiny_shapesworld
    sizes = {"train": 60, "val": 12, "test": 24}
    contents = {}
    for split, n in sizes.items():
        ann = annotations(root, split)
        assert len(ann) == n and all(path.startswith(f"{split}/") for path in ann)
        contents[split] = {hashlib.md5((root / "images" / p).read_bytes()).hexdigest() for p in ann}
        assert len(contents[split]) == n  # no duplicate images within a split either
    assert (
        not contents["train"] & contents["val"]
        and not contents["train"] & contents["test"]
        and not contents["val"] & contents["test"]
    )
    expectations = {
        "captions_train.json": "train/",
        "instruct_train.json": "train/",
        "captions_val.json": "val/",
        "instruct_val.json": "val/",
        "vqa_val.jsonl": "val/",
        "vqa_test.jsonl": "test/",
        **{f"pope_{s}.jsonl": "test/" for s in POPE_SPLITS},
    }
    for name, prefix in expectations.items():
        records = read_manifest(root / name)
        assert records and all(r["image"].startswith(prefix) for r in records if "image" in r), name
        assert len({r["id"] for r in records}) == len(records)


def test_scenes_vocabulary_and_occlusion(tiny_shapesworld):
    assert len(SHAPES) >= 5 and len(COLOURS) == 6 and len(all_objects()) == len(SHAPES) * 6
    records = [
        rec
        for split in ("train", "val", "test")
        for rec in read_manifest(tiny_shapesworld / f"annotations_{split}.jsonl")
    ]
    counts = Counter(len(rec["objects"]) for rec in records)
    assert set(counts) == {1, 2, 3, 4}
    visible = [o["visible"] for rec in records for o in rec["objects"]]
    assert min(visible) >= 0.55 and any(v < 1.0 for v in visible)  # occlusion happens, never total
    config = json.loads((tiny_shapesworld / "config.json").read_text())
    assert config["train_images"] == 60 and config["generator_version"] == 1


def test_text_is_true_to_the_scene(tiny_shapesworld):
    ann = annotations(tiny_shapesworld, "train")
    existence = re.compile(r"Is there an? (\w+ \w+) in the image\?")
    count_shape = re.compile(r"How many (\w+?)e?s are there\?")
    checked = Counter()
    for record in read_manifest(tiny_shapesworld / "instruct_train.json"):
        if "image" not in record:
            checked["text_only"] += 1
            continue
        present = ann[record["image"]]
        turns = record["conversations"]
        assert "<image>" in turns[0]["value"]
        for question, answer in zip(turns[::2], turns[1::2]):
            q, a = question["value"], answer["value"]
            if m := existence.search(q):
                assert a.startswith("Yes") == (m.group(1) in present), (record["id"], q, a)
                checked["existence"] += 1
            elif (m := count_shape.search(q)) and a.isdigit():
                shape = m.group(1) if m.group(1) in SHAPES else m.group(1) + "e"
                assert int(a) == sum(name.endswith(" " + shape) for name in present), (q, a)
                checked["count"] += 1
    assert checked["existence"] > 20 and checked["text_only"] > 0
    yes = sum(
        1
        for r in read_manifest(tiny_shapesworld / "instruct_train.json")
        for t in r["conversations"][1::2]
        if t["value"].startswith("Yes")
    )
    no = sum(
        1
        for r in read_manifest(tiny_shapesworld / "instruct_train.json")
        for t in r["conversations"][1::2]
        if t["value"].startswith("No")
    )
    assert 0.6 < yes / no < 1.6


def test_relation_of_an_asked_object_to_the_scene(tiny_shapesworld, tmp_path):
    scene = ["red circle", "blue star"]
    assert relation_to_scene("red circle", scene) == "present"
    assert relation_to_scene("red star", scene) == "shares_colour_and_shape"
    assert relation_to_scene("red square", scene) == "shares_colour"
    assert relation_to_scene("green star", scene) == "shares_shape"
    assert relation_to_scene("green square", scene) == "unrelated"
    relations = SceneRelations(str(tiny_shapesworld / "annotations_test.jsonl"))
    test_ann = annotations(tiny_shapesworld, "test")
    seen = Counter()
    for record in read_manifest(tiny_shapesworld / "pope_adversarial.jsonl"):
        relation = relations(record)
        assert (relation == "present") == (record["label"] == "yes")
        assert relation == relation_to_scene(record["object"], test_ann[record["image"]])
        seen[relation] += 1
    assert seen["present"] and sum(seen.values()) > seen["present"]
    with pytest.raises(ValueError, match=r"'pope-x': image 'test/nope\.png' is not in .*annotations_test"):
        relations({"id": "pope-x", "image": "test/nope.png", "object": "red circle"})
    with pytest.raises(ValueError, match=r"field 'object' must be '<colour> <shape>', got None"):
        relations({"id": "pope-y", "image": record["image"]})
    bad = tmp_path / "scenes.jsonl"
    bad.write_text('{"image": "a.png", "objects": [{"name": "red circle"}]}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"scenes\.jsonl: line 2: field 'objects'"):
        SceneRelations(str(bad))


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_is_balanced_and_negatives_are_truly_absent(tiny_shapesworld, split):
    test_ann = annotations(tiny_shapesworld, "test")
    records = read_manifest(tiny_shapesworld / f"pope_{split}.jsonl")
    labels = Counter(r["label"] for r in records)
    assert labels["yes"] == labels["no"] > 0
    for r in records:
        present = set(test_ann[r["image"]])
        assert (r["object"] in present) == (r["label"] == "yes"), r
        assert (
            r["text"] == f"Is there {'an' if r['object'][0] in 'aeiou' else 'a'} {r['object']} in the image?"
        )
        assert r["question_id"] == r["id"] and r["category"] == split
        assert r["conversations"][1]["value"] == r["label"].capitalize()
    per_image = Counter((r["image"], r["label"]) for r in records)
    assert all(per_image[(img, "yes")] == per_image[(img, "no")] for img, _ in per_image)


def test_popular_and_adversarial_negatives_follow_the_training_statistics(tiny_shapesworld):
    stats = ObjectStats.from_scenes(annotations(tiny_shapesworld, "train").values())
    test_ann = annotations(tiny_shapesworld, "test")
    negatives = {
        split: [r for r in read_manifest(tiny_shapesworld / f"pope_{split}.jsonl") if r["label"] == "no"]
        for split in POPE_SPLITS
    }
    by_image = lambda recs: {img: [r["object"] for r in recs if r["image"] == img] for img in test_ann}  # noqa: E731
    popular, adversarial = by_image(negatives["popular"]), by_image(negatives["adversarial"])
    for image, present in test_ann.items():
        absent = [o for o in all_objects() if o not in present]
        k = len(popular[image])
        # popular: exactly the k most frequent training objects absent from this image
        assert sorted(popular[image]) == sorted(stats.popular_order(absent)[:k])
        freq = [stats.frequency[o] for o in popular[image]]
        assert min(freq) >= sorted((stats.frequency[o] for o in absent), reverse=True)[k - 1]
        # adversarial: the absent objects that co-occur most with the present ones
        score = {o: sum(stats.cooc(o, p) for p in set(present)) for o in absent}
        chosen = [score[o] for o in adversarial[image]]
        assert min(chosen) >= sorted(score.values(), reverse=True)[k - 1]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([stats.frequency[r["object"]] for r in negatives["popular"]]) > mean(
        [stats.frequency[r["object"]] for r in negatives["random"]]
    )

    def cooc(r):
        return sum(stats.cooc(r["object"], p) for p in set(test_ann[r["image"]]))

    assert mean([cooc(r) for r in negatives["adversarial"]]) > mean([cooc(r) for r in negatives["random"]])


def test_cooccurrence_prior_is_realistic():
    prior = ObjectPrior(seed=0)
    rng = random.Random(0)
    pairs, singles, scenes = Counter(), Counter(), 4000
    for _ in range(scenes):
        names = sorted(set(prior.sample_names(rng, 3, 0.0)))
        singles.update(names)
        pairs.update((a, b) for i, a in enumerate(names) for b in names[i + 1 :])

    def lift(a, b):
        expected = singles[a] * singles[b] / scenes
        return pairs[(min(a, b), max(a, b))] / max(expected, 1e-9)

    companion = [lift(a, b) for a in prior.objects for b in prior.companions[a] if a < b]
    others = [
        lift(a, b) for a in prior.objects for b in prior.objects if a < b and b not in prior.companions[a]
    ]
    assert sum(companion) / len(companion) > 2 * sum(others) / len(others)
    top, bottom = singles.most_common()[0][1], singles.most_common()[-1][1]
    assert top > 5 * bottom  # some objects are much more popular than others


def test_tokenizer_loads_with_autotokenizer(tiny_shapesworld):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_shapesworld / "tokenizer"))
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert {"<pad>", "<s>", "</s>", "<unk>", "<image>"} <= set(tok.all_special_tokens)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    caption = read_manifest(tiny_shapesworld / "captions_train.json")[0]["conversations"][1]["value"]
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == caption
    assert len(ids) < len(caption) / 2.5  # learned merges, not bytes
    assert tok("<image>", add_special_tokens=False).input_ids == [4]


def test_config_file_matches_the_generator_defaults():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf/data/shapesworld.yaml")
    assert instantiate(cfg.generator) == ShapesWorldConfig()
    assert ShapesWorldConfig.from_any(cfg.generator) == ShapesWorldConfig()
    real = OmegaConf.create({"data": OmegaConf.load(REPO / "conf/data/llava_json.yaml")})
    assert real.data.stages.stage2.train == "data/llava/llava_v1_5_mix665k.json"
    with pytest.raises(ValueError, match="unknown ShapesWorld config key"):
        ShapesWorldConfig.from_any({"nope": 1})


def test_cli_generate_equals_the_python_function(tmp_path, capsys):
    small = {"train_images": 8, "val_images": 2, "test_images": 3, "tokenizer_vocab_size": 300}
    sets = [arg for k, v in small.items() for arg in ("--set", f"{k}={v}")]
    assert main(["data", "generate", "--out", str(tmp_path / "cli"), "--no-progress", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["captions_train"] == 8
    generate_shapesworld(tmp_path / "py", small)
    assert tree_digest(tmp_path / "cli") == tree_digest(tmp_path / "py")
    config = tmp_path / "gen.yaml"
    config.write_text("generator:\n" + "".join(f"  {k}: {v}\n" for k, v in small.items()))
    assert (
        main(["data", "generate", "--out", str(tmp_path / "yaml"), "--config", str(config), "--no-progress"])
        == 0
    )
    assert tree_digest(tmp_path / "yaml") == tree_digest(tmp_path / "py")
    assert dataclasses.asdict(ShapesWorldConfig.from_any(small))["train_images"] == 8


def test_cli_train_tokenizer(tiny_shapesworld, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    assert (
        main(
            [
                "data",
                "train-tokenizer",
                str(tiny_shapesworld / "captions_train.json"),
                "--out",
                str(out),
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    assert "tokenizer with" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<image>") == 4 and tok.pad_token == "<pad>"
