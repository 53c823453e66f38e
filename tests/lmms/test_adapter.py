"""The lmms-eval adapter in process: found by name through the entry point, asks the model as our
evaluator does (same answers, same metrics on our ShapesWorld tasks), batches per generation
settings, honours max_new_tokens and until, text-only documents, refusals naming the task, and a
local GQA-like task on PNG files scored by lmms-eval's own exact_match."""

from __future__ import annotations

import json
import textwrap

import pytest
from lmms_eval import evaluator
from lmms_eval.api.instance import Instance
from PIL import Image

from moe_llava.evaluation.lmms import MoELlavaLmms, UnsupportedRequest, cut_at_stop
from moe_llava.inference import Answerer
from tests.lmms.conftest import BATCH, LIMIT, POPE_SPLITS, question_ids


@pytest.fixture(scope="module")
def adapter(tiny_export) -> MoELlavaLmms:
    return MoELlavaLmms(pretrained=str(tiny_export), batch_size=2)


def test_the_entry_point_resolves_moe_llava_by_name():
    from lmms_eval.models import get_model

    assert get_model("moe_llava") is MoELlavaLmms


def test_simple_evaluate_on_our_tasks_gives_our_evaluators_answers_and_metrics(
    tiny_export, task_manager, our_evaluation, world
):
    tasks = [f"shapesworld_pope_{s}" for s in POPE_SPLITS] + ["shapesworld_pope", "shapesworld_vqa_test"]
    results = evaluator.simple_evaluate(
        model="moe_llava",
        model_args=f"pretrained={tiny_export}",
        tasks=["shapesworld_pope", "shapesworld_vqa_test"],
        batch_size=BATCH,
        limit=LIMIT,
        task_manager=task_manager,
        log_samples=True,
        verbosity="WARNING",
    )
    by_task = {**results["results"], **results["groups"]}
    assert set(tasks) <= set(by_task)
    ours = our_evaluation["metrics"]
    for split in POPE_SPLITS:
        lmms = by_task[f"shapesworld_pope_{split}"]
        for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert lmms[f"{metric},none"] == pytest.approx(ours[f"pope/{split}/{metric}"]), (split, metric)
        # same answer to every question, paired by id (doc_id is the line in the question file)
        ids = question_ids(world / f"pope_{split}.jsonl", LIMIT)
        answers = {
            ids[s["doc_id"]]: s["filtered_resps"][0] for s in results["samples"][f"shapesworld_pope_{split}"]
        }
        assert answers == our_evaluation["answers"][f"pope_{split}"]
        assert len(set(answers.values())) > 1  # the scrambled model answers differently per question
    assert by_task["shapesworld_pope"]["f1,none"] == pytest.approx(ours["pope/mean_f1"])
    assert by_task["shapesworld_vqa_test"]["accuracy,none"] == pytest.approx(ours["vqa/test/accuracy"])
    ids = question_ids(world / "vqa_test.jsonl", LIMIT)
    vqa = {ids[s["doc_id"]]: s["filtered_resps"][0] for s in results["samples"]["shapesworld_vqa_test"]}
    assert vqa == our_evaluation["answers"]["vqa_test"]


def _request(task: str, doc_id: int, ctx: str, gen_kwargs: dict, output_type: str = "generate_until"):
    args = (ctx, gen_kwargs, lambda doc: doc["visuals"], doc_id, task, "test")
    return Instance(output_type, args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def test_batches_by_generation_settings_in_request_order_with_stops_and_text_only(adapter, world):
    images = sorted((world / "images" / "test").glob("*.png"))[:3]
    docs = [
        {"visuals": [Image.open(images[0]).convert("RGB")]},  # a PIL image, as lmms-eval's tasks give
        {"visuals": [str(images[1])]},  # a path
        {"visuals": []},  # text-only
        {"visuals": [str(images[2])]},
    ]
    adapter.task_dict = {"t": {"test": docs}}
    prompts = ["What shape is it?", "What colour?", "Say something.", "How many?"]
    reference = {n: Answerer(adapter.loaded, max_new_tokens=n) for n in (3, 6)}
    asked = [(images[0], prompts[0]), (images[1], prompts[1]), (None, prompts[2]), (images[2], prompts[3])]
    long_answers = reference[6].answer(asked)
    stop = long_answers[1][2:4]  # a stop string inside doc 1's answer
    short, long_ = (
        {"max_new_tokens": 3, "until": []},
        {"max_new_tokens": 6, "until": [stop], "temperature": 0},
    )
    settings = [short, long_, long_, short]  # interleaved: two batches, answers back in request order
    requests = [_request("t", i, prompts[i], settings[i]) for i in range(4)]
    got = adapter.generate_until(requests)
    assert got[0] == reference[3].answer([asked[0]])[0]
    assert got[3] == reference[3].answer([asked[3]])[0]
    assert got[1] == long_answers[1][: long_answers[1].find(stop)] and len(got[1]) < len(long_answers[1])
    assert got[2] == cut_at_stop(long_answers[2], [stop])
    assert got[0] != long_answers[0]  # 3 new tokens, not 6
    assert long_answers[2] != reference[6].answer([(images[0], prompts[2])])[0]  # text-only is not image 0


def test_what_the_model_cannot_do_is_refused_naming_the_task(adapter, world):
    image = str(next((world / "images" / "test").glob("*.png")))
    adapter.task_dict = {"multi_image_task": {"test": [{"visuals": [image, image]}]}}
    with pytest.raises(UnsupportedRequest, match="task 'multi_image_task', doc 0: 2 images in one document"):
        adapter.generate_until([_request("multi_image_task", 0, "?", {"max_new_tokens": 2})])
    adapter.task_dict = {"video_task": {"test": [{"visuals": ["/data/clip.mp4"]}]}}
    with pytest.raises(UnsupportedRequest, match=r"task .video_task.*not an image"):
        adapter.generate_until([_request("video_task", 0, "?", {})])
    adapter.task_dict = {"sampled": {"test": [{"visuals": []}]}}
    with pytest.raises(UnsupportedRequest, match="task 'sampled': asks for sampling"):
        adapter.generate_until([_request("sampled", 0, "?", {"do_sample": True, "temperature": 0.7})])
    loglikelihood = Instance(
        "loglikelihood", ("ctx", " A"), idx=0, metadata={"task": "scienceqa_mc", "doc_id": 0, "repeats": 1}
    )
    with pytest.raises(UnsupportedRequest, match=r"task\(s\) \['scienceqa_mc'\]: loglikelihood"):
        adapter.loglikelihood([loglikelihood])
    with pytest.raises(UnsupportedRequest, match="multi-round"):
        adapter.generate_until_multi_round([_request("chat_task", 0, "?", {}, "generate_until_multi_round")])
    with pytest.raises(ValueError, match="unknown arguments"):
        MoELlavaLmms(pretrained="x", temperature="0.2")


def test_a_registered_model_uri_loads(tracking_uri, logged_model, make_registry, model_name, adapter, world):
    registry = make_registry()
    registry.register(logged_model["model_uri"], {"pope/mean_f1": 0.5}, run_id=logged_model["run_id"])
    by_uri = MoELlavaLmms(pretrained=f"models:/{model_name}@champion", tracking_uri=tracking_uri)
    image = str(next((world / "images" / "test").glob("*.png")))
    docs = {"t": {"test": [{"visuals": [image]}]}}
    by_uri.task_dict = adapter.task_dict = docs
    request = _request("t", 0, "What shape is it?", {"max_new_tokens": 4})
    assert by_uri.generate_until([request]) == adapter.generate_until([request])


GQA_LIKE = """\
dataset_path: json
dataset_kwargs:
  data_files:
    testdev: gqa_like.json
task: gqa_like
test_split: testdev
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 0.0
"""
GQA_UTILS = """
from pathlib import Path
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / "images" / doc["image"]).convert("RGB")]

def doc_to_text(doc):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."
"""


def test_a_local_gqa_like_task_on_png_files_is_scored_by_lmms_evals_exact_match(
    tmp_path, tiny_export, adapter
):
    from lmms_eval.tasks import TaskManager

    (tmp_path / "images").mkdir()
    prompt = "What colour?\nAnswer the question using a single word or phrase."
    docs, requests = [], []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (24, 24), colour).save(tmp_path / "images" / f"{i}.png")
        docs.append({"question_id": str(i), "image": f"{i}.png", "question": "What colour?", "answer": "zzz"})
        requests.append(_request("t", i, prompt, {"max_new_tokens": 8}))
    adapter.task_dict = {"t": {"test": [{"visuals": [str(tmp_path / "images" / d["image"])]} for d in docs]}}
    answers = adapter.generate_until(requests)  # what the model answers to each
    for i in (0, 2):  # right answers for half the documents, differing only in case and punctuation
        docs[i]["answer"] = "".join(c.upper() if c.isascii() else c for c in answers[i]) + "."
    (tmp_path / "gqa_like.json").write_text(json.dumps(docs))
    (tmp_path / "gqa_like.yaml").write_text(GQA_LIKE)
    (tmp_path / "utils.py").write_text(textwrap.dedent(GQA_UTILS))
    results = evaluator.simple_evaluate(
        model="moe_llava",
        model_args=f"pretrained={tiny_export}",
        tasks=["gqa_like"],
        batch_size=2,
        task_manager=TaskManager(include_path=[str(tmp_path)], include_defaults=False),
        log_samples=True,
        verbosity="WARNING",
    )
    assert [s["filtered_resps"][0] for s in results["samples"]["gqa_like"]] == answers
    assert results["results"]["gqa_like"]["exact_match,none"] == 0.5
