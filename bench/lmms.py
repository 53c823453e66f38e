"""lmms-eval: questions/s through the adapter against our own evaluator, on the same questions.

    .venv-lmms/bin/python -m bench.lmms [--quick] [--model EXPORT] [--questions 64] [--batch-size 8]

Runs in the lmms-eval venv (``make setup-lmms``). The model: ``--model`` (an export folder, e.g.
``artifacts/stage3/export`` after ``make run``), else the tiny_cpu recipe built untrained, upcycled
as stage 3 exports it, weights scrambled so that answers differ per image. The questions: the first
``--questions`` of ShapesWorld POPE random (``data/shapesworld``, else a small generated world).
Variants, timed interleaved (one call each per round):

* ``evaluator``: what ``moe-llava eval run`` does for a question file (its dataset, ``generate_answers``);
* ``adapter``: :meth:`MoELlavaLmms.generate_until` on the requests lmms-eval builds for our
  ``shapesworld_pope_random`` task (its prompt, its ``doc_to_visual``: the image paths);
* ``simple_evaluate``: lmms-eval's whole evaluation of that task (dataset loading, requests,
  the adapter, scoring), ``limit`` = the same questions.

Each variant's answers are checked equal to the evaluator's. ``adapter/evaluator`` is the paired
ratio of questions/s (1.0: the adapter costs nothing).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch.utils import benchmark

from bench import common

SUITE = "lmms"
TASK = "shapesworld_pope_random"


def tiny_moe_export(data_root: Path, out: Path) -> Path:
    """The tiny_cpu recipe, untrained, upcycled with conf/moe/paper.yaml, scrambled weights."""
    from hydra.utils import instantiate

    from moe_llava.data.tokenizer import load_tokenizer
    from moe_llava.model.builder import build_image_processor
    from moe_llava.training.run import export_stage

    cfg = common.compose_config(["experiment=tiny_cpu", "model.pretrained=false", f"data.root={data_root}"])
    tokenizer = load_tokenizer(data_root / "tokenizer")
    torch.manual_seed(0)
    dense = instantiate(cfg.model, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in dense.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5, generator=generator)
    moe = common.upcycled_copy(dense)
    export_stage(moe, tokenizer, build_image_processor(cfg.model.vision_tower, pretrained=False), out)
    return out


def run(
    model_dir: Path,
    data_root: Path,
    questions: int = 64,
    batch_size: int = 8,
    rounds: int = 3,
    warmup: int = 1,
) -> dict:
    from lmms_eval import evaluator
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks import TaskManager

    from moe_llava.evaluation.benchmarks import PopeBenchmark
    from moe_llava.evaluation.lmms import MoELlavaLmms
    from moe_llava.evaluation.lmms_benchmark import render_shapesworld_tasks
    from moe_llava.evaluation.lmms_scoring import (
        SHAPESWORLD_IMAGES_ENV,
        conversation_doc_to_text,
        shapesworld_doc_to_visual,
    )
    from moe_llava.evaluation.runner import build_dataset
    from moe_llava.inference import generate_answers

    os.environ[SHAPESWORLD_IMAGES_ENV] = str(data_root / "images")
    path = data_root / "pope_random.jsonl"
    bench = PopeBenchmark("random", path)
    bench.load(limit=questions, image_folder=data_root / "images")
    docs = [json.loads(line) for line in path.read_text().splitlines()[:questions]]
    max_new_tokens = 16  # the task's and conf/evaluation/default.yaml's
    adapter = MoELlavaLmms(pretrained=str(model_dir), batch_size=batch_size)
    loaded = adapter.loaded
    adapter.task_dict = {TASK: {"test": docs}}
    gen_kwargs = {"max_new_tokens": max_new_tokens, "until": []}
    requests = []
    for i, doc in enumerate(docs):
        args = (conversation_doc_to_text(doc), dict(gen_kwargs), shapesworld_doc_to_visual, i, TASK, "test")
        meta = {"task": TASK, "doc_id": i, "repeats": 1}
        requests.append(Instance("generate_until", args, idx=0, metadata=meta))
    with tempfile.TemporaryDirectory(prefix="bench-lmms-") as tmp:
        manager = TaskManager(
            include_path=[str(render_shapesworld_tasks(data_root, Path(tmp) / "tasks"))],
            include_defaults=False,
        )
        answers: dict[str, list[str]] = {}

        def ours():
            dataset = build_dataset(loaded, bench.questions, path, image_folder=data_root / "images")
            got = generate_answers(loaded, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens)
            answers["evaluator"] = [a["text"] for a in got]

        def through_adapter():
            adapter.task_dict = {TASK: {"test": docs}}  # simple_evaluate sets its own
            answers["adapter"] = adapter.generate_until(requests)

        def through_lmms_eval():
            results = evaluator.simple_evaluate(
                model=adapter, tasks=[TASK], limit=questions, task_manager=manager, log_samples=True,
                verbosity="ERROR",
            )  # fmt: skip
            samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
            answers["simple_evaluate"] = [s["filtered_resps"][0] for s in samples]

        times = common.interleaved(
            {"evaluator": ours, "adapter": through_adapter, "simple_evaluate": through_lmms_eval},
            rounds,
            warmup=warmup,
            label=f"answer {questions} POPE questions, {max_new_tokens} new tokens",
            sub_label=f"batch {batch_size}",
        )
    for name in ("adapter", "simple_evaluate"):
        assert answers[name] == answers["evaluator"], f"{name}'s answers differ from the evaluator's"
    row = {
        "questions": questions,
        "batch_size": batch_size,
        "questions_per_s": {name: questions / common.median_s(ms) for name, ms in times.items()},
        "seconds_per_round": {name: [t for m in ms for t in m.raw_times] for name, ms in times.items()},
        "adapter_vs_evaluator": common.paired_ratio(times["evaluator"], times["adapter"]),
        "simple_evaluate_vs_evaluator": common.paired_ratio(times["evaluator"], times["simple_evaluate"]),
    }
    return {
        "config": {
            "model": str(model_dir),
            "data_root": str(data_root),
            "rounds": rounds,
            "moe": loaded.model.is_moe,
        },
        "environment": common.environment(torch.device("cpu")),
        "rows": [row],
        "measurements": [m for ms in times.values() for m in ms],
    }


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an export folder (default: the tiny MoE)")
    parser.add_argument("--data-root", type=Path, default=Path("data/shapesworld"))
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.quick:
        args.questions = 16
    rounds = args.rounds or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-lmms-model-") as tmp:
        data_root = args.data_root
        if not (data_root / "pope_random.jsonl").is_file():
            from moe_llava.data.shapesworld import generate_shapesworld

            data_root = Path(tmp) / "shapesworld"
            generate_shapesworld(data_root, {"train_images": 40, "val_images": 8, "test_images": 40})
        model = args.model or tiny_moe_export(data_root, Path(tmp) / "export")
        result = run(model, data_root, args.questions, args.batch_size, rounds)
    benchmark.Compare(result.pop("measurements")).print()
    row = result["rows"][0]
    qps = row["questions_per_s"]
    print(
        f"questions/s: evaluator {qps['evaluator']:.2f}, adapter {qps['adapter']:.2f}, "
        f"simple_evaluate {qps['simple_evaluate']:.2f}; adapter/evaluator {row['adapter_vs_evaluator']:.3f}, "
        f"simple_evaluate/evaluator {row['simple_evaluate_vs_evaluator']:.3f}"
    )
    print(f"written: {common.write_result(SUITE, result, args.out)}")


if __name__ == "__main__":
    main()
