"""`moe-llava eval ...`: run the evaluation (Hydra) or score existing answer files.

    moe-llava eval run experiment=tiny_cpu stage=stage3 [hydra overrides]
    moe-llava eval pope-score --questions pope_random.jsonl --answers answers.jsonl
    moe-llava eval vqa-score  --questions vqa_test.jsonl    --answers answers.jsonl
    moe-llava eval vision-probe --data-root data/shapesworld --set patch_size=16
    moe-llava eval benchmark --model models:/moe-llava@champion --tasks paper   # lmms-eval

The scorers print their metrics as JSON on stdout; questions without an answer and answers to
unknown question ids are counted and listed in that JSON and summarised on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_llava.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a stage (POPE, VQA, expert load) or score answer files"
    )
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    run = commands.add_parser(
        "run",
        help="evaluate a stage's export: moe-llava eval run experiment=tiny_cpu stage=stage3 [overrides]",
        add_help=False,  # --help and all arguments go to Hydra
    )
    run.add_argument("overrides", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)

    for name, kind in (("pope-score", "pope"), ("vqa-score", "vqa")):
        score = commands.add_parser(
            name,
            help=f"score a {kind.upper()} answers file (JSONL: question_id, text) against its question file",
        )
        score.add_argument("--questions", required=True, help="question file (JSONL/JSON with question_id)")
        score.add_argument("--answers", required=True, help="answers file (JSONL with question_id and text)")
        score.set_defaults(func=_score, kind=kind)

    bench = commands.add_parser(
        "benchmark",
        help="the paper's benchmark table through lmms-eval (make setup-lmms first; docs/evaluation.md)",
    )
    bench.add_argument(
        "--model", required=True, help="an export folder, or an MLflow URI such as models:/moe-llava@champion"
    )
    bench.add_argument(
        "--tasks",
        default="shapesworld",
        help="paper | paper-all | shapesworld | comma-separated lmms-eval task names (default: shapesworld)",
    )
    bench.add_argument("--limit", type=int, default=None, help="first N documents of each task (quick runs)")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    bench.add_argument(
        "--data-root", default="data/shapesworld", help="the ShapesWorld folder of the shapesworld tasks"
    )
    bench.add_argument(
        "--output-dir", default=None, help="keep lmms-eval's files here (default: a temp folder)"
    )
    bench.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking/registry URI (default: as training)"
    )
    bench.add_argument("--experiment", default="benchmarks", help="MLflow experiment of the benchmark run")
    bench.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    bench.add_argument(
        "--offline",
        action="store_true",
        help="never reach the hub (HF_HUB_OFFLINE): hub benchmarks then need a pre-filled HF_HOME",
    )
    bench.add_argument(
        "--lmms-python", default=None, help="the interpreter with lmms-eval (default: .venv-lmms)"
    )
    bench.add_argument("--timeout-s", type=float, default=None, help="give lmms-eval at most this long")
    bench.add_argument("--json", action="store_true", help="print the metrics as JSON after the table")
    bench.set_defaults(func=_benchmark)

    probe = commands.add_parser(
        "vision-probe",
        help="train the model's vision tower directly on the POPE objects: the ceiling the VLM is measured against",
    )
    probe.add_argument(
        "--data-root", default="data/shapesworld", help="ShapesWorld folder (with annotations_*.jsonl)"
    )
    probe.add_argument("--model", default=None, help="model config YAML (default: conf/model/tiny.yaml)")
    probe.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a vision-tower config value, e.g. --set patch_size=16",
    )
    probe.add_argument(
        "--tower",
        default=None,
        help="a pretrained vision tower folder (e.g. <run_dir>/backbones/vision), probed frozen",
    )
    probe.add_argument("--epochs", type=int, default=6)
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--lr", type=float, default=1e-3)
    probe.add_argument(
        "--time-budget-s", type=float, default=None, help="stop after the epoch that crosses it"
    )
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", default=None, help="write the per-epoch results as JSON here")
    probe.set_defaults(func=_vision_probe)


def _run(args: argparse.Namespace) -> int:
    from moe_llava import evaluate

    sys.argv = [sys.argv[0], *args.overrides]  # Hydra parses sys.argv
    evaluate.main()
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from moe_llava.evaluation.lmms_benchmark import BenchmarkError, expand_tasks, run_benchmark

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    names = expand_tasks(args.tasks)
    try:
        summary = run_benchmark(
            args.model,
            names,
            output_dir=args.output_dir,
            data_root=args.data_root,
            limit=args.limit,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            tracking_uri=args.tracking_uri,
            experiment_name=args.experiment,
            mlflow=not args.no_mlflow,
            offline=args.offline or all(n.startswith("shapesworld") for n in names),
            python=args.lmms_python,
            timeout_s=args.timeout_s,
            log=lambda line: print(line, file=sys.stderr if line.startswith("lmms-eval:") else sys.stdout),
        )
    except BenchmarkError as err:
        print(f"moe-llava: benchmark failed: {err}", file=sys.stderr)
        return 1
    if summary["run_id"]:
        version = summary["registered_version"]
        print(
            f"MLflow run {summary['run_id']}" + (f"; registered version {version} tagged" if version else "")
        )
    if args.json:
        print(json.dumps(summary["metrics"], indent=2))
    return 0


def _vision_probe(args: argparse.Namespace) -> int:
    import yaml

    from moe_llava.evaluation.vision_probe import ProbeConfig, run_probe
    from moe_llava.paths import CONF_DIR

    model_path = args.model or CONF_DIR / "model" / "tiny.yaml"
    with open(model_path, encoding="utf-8") as handle:
        tower = yaml.safe_load(handle)["vision_tower"]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in tower["config"]:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(tower['config'])}")
        tower["config"][key] = yaml.safe_load(value)
    config = ProbeConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        time_budget_s=args.time_budget_s,
        seed=args.seed,
        pretrained_tower=args.tower,
    )
    result = run_probe(args.data_root, tower, config, log=lambda line: print(line, file=sys.stderr))
    summary = {"data_root": str(args.data_root), **result.final}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"data_root": str(args.data_root), **vars(result)}, handle, indent=2)
    return 0


def _score(args: argparse.Namespace) -> int:
    from moe_llava.evaluation.files import answers_by_id, read_answers, read_questions
    from moe_llava.evaluation.pope import score_pope
    from moe_llava.evaluation.vqa import score_vqa

    questions = read_questions(args.questions, kind=args.kind)
    answers = answers_by_id(read_answers(args.answers))
    result = (score_pope if args.kind == "pope" else score_vqa)(questions, answers)
    result = {"questions": args.questions, "answers": args.answers, **result}
    print(json.dumps(result, indent=2))
    if result["num_missing"]:
        ids = ", ".join(result["missing_ids"][:10]) + (" ..." if result["num_missing"] > 10 else "")
        print(
            f"warning: {result['num_missing']} question(s) in {args.questions} have no answer in "
            f"{args.answers} and are not scored: {ids}",
            file=sys.stderr,
        )
    if result["num_unknown"]:
        ids = ", ".join(result["unknown_ids"][:10]) + (" ..." if result["num_unknown"] > 10 else "")
        print(
            f"warning: {result['num_unknown']} answer(s) in {args.answers} are for question ids not in "
            f"{args.questions}: {ids}",
            file=sys.stderr,
        )
    return 0
