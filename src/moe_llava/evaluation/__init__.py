"""Evaluation: POPE, short-answer VQA and the expert-load analysis (see docs/evaluation.md).

``python -m moe_llava.evaluate experiment=... stage=stage3`` runs it all on a stage's export
(``runner``); the pieces also work on their own (e.g. scoring an answers file from another model).
Modules: ``runner``, ``benchmarks`` (one class per benchmark), ``files`` (question and answer
files), ``pairing``, ``pope``, ``vqa``, ``expert_load``, ``vision_probe``, ``cli`` (``moe-llava eval``).
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "ExpertLoadRecorder": "moe_llava.evaluation.expert_load",
    "expert_load_metrics": "moe_llava.evaluation.expert_load",
    "expert_load_plot_data": "moe_llava.evaluation.expert_load",
    "plot_expert_load": "moe_llava.evaluation.expert_load",
    "Answer": "moe_llava.evaluation.files",
    "Question": "moe_llava.evaluation.files",
    "answers_by_id": "moe_llava.evaluation.files",
    "read_answers": "moe_llava.evaluation.files",
    "read_questions": "moe_llava.evaluation.files",
    "EvalFileError": "moe_llava.errors",
    "Pairing": "moe_llava.evaluation.pairing",
    "pair_answers": "moe_llava.evaluation.pairing",
    "POPE_SPLITS": "moe_llava.evaluation.pope",
    "PopeCounts": "moe_llava.evaluation.pope",
    "mean_f1": "moe_llava.evaluation.pope",
    "pope_yes_no": "moe_llava.evaluation.pope",
    "score_pope": "moe_llava.evaluation.pope",
    "normalize_answer": "moe_llava.evaluation.vqa",
    "score_vqa": "moe_llava.evaluation.vqa",
    "BENCHMARKS": "moe_llava.evaluation.benchmarks",
    "Benchmark": "moe_llava.evaluation.benchmarks",
    "PopeBenchmark": "moe_llava.evaluation.benchmarks",
    "VqaBenchmark": "moe_llava.evaluation.benchmarks",
    "run_evaluation": "moe_llava.evaluation.runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
