"""The lmms-eval side that runs without lmms-eval: our task functions score as our evaluator does,
results become ``lmms/<task>/<metric>``, a failed task fails, the paper table, the registry merge.

(The adapter and lmms-eval itself: tests/lmms/, run in .venv-lmms by `make test`.)"""

from __future__ import annotations

import sys

import pytest

from moe_llava.evaluation import lmms_benchmark as bench
from moe_llava.evaluation import lmms_scoring as scoring
from moe_llava.evaluation.files import Question
from moe_llava.evaluation.pope import score_pope
from moe_llava.evaluation.vqa import score_vqa

POPE_ANSWERS = [
    ("yes", "Yes."),  # the paper's rule: "Yes." is yes (lmms-eval's own POPE task: wrong)
    ("yes", "No, there is not."),
    ("no", "There is no red star"),
    ("no", "Yes"),
    ("yes", "Not really"),  # capitalised "Not" is not a negative word
    ("no", "no"),
    ("yes", ""),
    ("no", "Yes, I think so"),
]


def _pope_question(i: int, label: str) -> Question:
    record = {"id": f"q{i}", "conversations": [{"from": "human", "value": "Is there a cat?"}]}
    return Question(f"q{i}", f"line {i + 1}", record, "Is there a cat?", label=label)


def test_pope_task_functions_give_our_evaluators_metrics_and_the_models_yes_ratio():
    docs = [{"question_id": f"q{i}", "label": label} for i, (label, _) in enumerate(POPE_ANSWERS)]
    records = [
        scoring.pope_process_results(doc, [answer])["f1"] for doc, (_, answer) in zip(docs, POPE_ANSWERS)
    ]
    ours = score_pope(
        [_pope_question(i, label) for i, (label, _) in enumerate(POPE_ANSWERS)],
        {f"q{i}": answer for i, (_, answer) in enumerate(POPE_ANSWERS)},
    )
    for metric in scoring.POPE_METRICS:
        assert getattr(scoring, f"pope_{metric}")(records) == pytest.approx(ours[metric]), metric
    assert scoring.pope_yes_ratio(records) == pytest.approx(5 / 8)  # the answers', not the labels' 4/8
    assert 0 < ours["f1"] < 1 and ours["precision"] != ours["recall"]


def test_vqa_task_function_is_our_normalised_exact_match():
    cases = [("Two.", "2"), ("The red circle", "red circle"), ("Yes, there is", "yes"), ("3.5", "3.5")]
    hits = [
        scoring.vqa_process_results({"question_id": "q", "answer": ref}, [ans])["accuracy"]
        for ans, ref in cases
    ]
    questions = [
        Question(f"q{i}", "", {"id": f"q{i}", "conversations": []}, "", answer=ref)
        for i, (_, ref) in enumerate(cases)
    ]
    ours = score_vqa(questions, {f"q{i}": ans for i, (ans, _) in enumerate(cases)})
    assert hits == [1.0, 1.0, 0.0, 1.0] and sum(hits) / len(hits) == ours["accuracy"]
    # the reference may also come from the record's final gpt turn
    doc = {
        "question_id": "q",
        "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "Two"}],
    }
    assert scoring.vqa_process_results(doc, ["2"]) == {"accuracy": 1.0}


def test_shapesworld_prompt_and_image_are_the_records(tmp_path, monkeypatch):
    doc = {
        "question_id": "pope-random-00000",
        "image": "test/000000.png",
        "conversations": [{"from": "human", "value": "<image>\nIs there a cat?\nAnswer briefly."}],
    }
    assert scoring.conversation_doc_to_text(doc) == "Is there a cat?\nAnswer briefly."
    assert (
        scoring.conversation_doc_to_text({"text": "Is it?"}, {"post_prompt": "\nShort."}) == "Is it?\nShort."
    )
    monkeypatch.setenv(scoring.SHAPESWORLD_IMAGES_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pope-random-00000.*test/000000.png not found"):
        scoring.shapesworld_doc_to_visual(doc)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "000000.png").write_bytes(b"png")
    assert scoring.shapesworld_doc_to_visual(doc) == [str(tmp_path / "test" / "000000.png")]
    assert scoring.shapesworld_doc_to_visual({"question_id": "t"}) == []  # text-only


def test_rendered_task_folder_reads_the_given_data_root(tmp_path):
    root = tmp_path / "world"
    with pytest.raises(ValueError, match="no ShapesWorld question files"):
        bench.render_shapesworld_tasks(root, tmp_path / "tasks")
    root.mkdir()
    (root / "pope_random.jsonl").write_text("{}\n")
    folder = bench.render_shapesworld_tasks(root, tmp_path / "tasks")
    text = (folder / "shapesworld_pope_random.yaml").read_text()
    assert f"test: {root.resolve()}/pope_random.jsonl" in text
    assert f"include: {bench.SHAPESWORLD_TASKS / '_shapesworld_pope_yaml'}" in text
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in bench.SHAPESWORLD_TASKS.glob("*.yaml")
    )


RESULTS = {
    "results": {
        "shapesworld_pope_random": {
            "alias": " - shapesworld_pope_random",
            "f1,none": 0.5,
            "f1_stderr,none": "N/A",
            "accuracy,none": 0.25,
        },
        "gqa": {"exact_match,none": 0.614, "exact_match,flexible-extract": 0.62, "bad,none": float("nan")},
        "moe_llava_pope": {"f1,none": 0.863},
        "mme": {"mme_perception_score,none": 1423.0, "mme_cognition_score,none": 300.0},
    },
    "groups": {"shapesworld_pope": {"f1,none": 0.5, "alias": "shapesworld_pope"}},
}


def test_results_become_lmms_task_metric_names_without_commas():
    metrics = bench.flat_metrics(RESULTS)
    assert metrics == {
        "lmms/shapesworld_pope_random/f1": 0.5,
        "lmms/shapesworld_pope_random/accuracy": 0.25,
        "lmms/gqa/exact_match": 0.614,
        "lmms/gqa/exact_match/flexible-extract": 0.62,
        "lmms/moe_llava_pope/f1": 0.863,
        "lmms/mme/mme_perception_score": 1423.0,
        "lmms/mme/mme_cognition_score": 300.0,
        "lmms/shapesworld_pope/f1": 0.5,
    }
    assert not any("," in name for name in metrics)


def test_a_task_without_results_fails_whatever_the_exit_status(tmp_path):
    bench.check_results(RESULTS, ["shapesworld_pope", "gqa"])
    with pytest.raises(bench.BenchmarkError, match=r"no metric for task.* textvqa_val"):
        bench.check_results(RESULTS, ["gqa", "textvqa_val"])
    # an "lmms-eval" that exits 0 and writes nothing (its CLI does that when evaluation fails)
    with pytest.raises(bench.BenchmarkError, match=r"lmms-eval failed \(exit 0, no results file\)"):
        bench.run_lmms(tmp_path / "export", ["gqa"], tmp_path / "out", python="/bin/true")
    # an interpreter without lmms-eval: the error carries the log's last lines
    with pytest.raises(bench.BenchmarkError, match=r"(?s)exit 1\b.*No module named"):
        bench.run_lmms(tmp_path / "export", ["gqa"], tmp_path / "out2", python=sys.executable, env={})


def test_task_presets_and_the_paper_table():
    assert bench.expand_tasks("paper") == [
        "vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "moe_llava_pope", "mme"
    ]  # fmt: skip
    assert {"mmvet", "llava_in_the_wild", "vqav2_test"} <= set(bench.expand_tasks("paper-all"))
    assert bench.expand_tasks("shapesworld,gqa,gqa") == [*bench.SHAPESWORLD_TASK_NAMES, "gqa"]
    with pytest.raises(ValueError, match="no task named"):
        bench.expand_tasks(" , ")
    assert bench.released_model({"text_config": {"model_type": "phi"}}) == "MoE-LLaVA-2.7Bx4-Top2"
    assert bench.released_model({"text_config": {"model_type": "llama"}}) is None
    table = bench.format_table(bench.flat_metrics(RESULTS), "MoE-LLaVA-2.7Bx4-Top2")
    gqa = next(line for line in table.splitlines() if line.startswith("GQA "))
    assert gqa.split()[1:] == ["gqa", "61.4", "61.4"]  # ours (0.614 -> %), the paper's
    pope = next(line for line in table.splitlines() if line.startswith("POPE F1"))
    assert pope.split()[2:] == ["moe_llava_pope", "86.3", "86.3"]
    assert "1423.0" in next(line for line in table.splitlines() if line.startswith("MME "))
    both = bench.format_table(bench.flat_metrics(RESULTS), None)  # no match: both MoE-LLaVA rows
    assert "MoE-LLaVA-1.8Bx4-Top2" in both and "MoE-LLaVA-2.7Bx4-Top2" in both


def test_lmms_python_is_explained_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(bench.LMMS_PYTHON_ENV, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        bench.lmms_python()
    monkeypatch.delenv(bench.LMMS_PYTHON_ENV)
    monkeypatch.setattr(bench, "DEFAULT_LMMS_VENV", tmp_path)
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="make setup-lmms"):
        bench.lmms_python()
