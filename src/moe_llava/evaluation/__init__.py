"""Evaluation: POPE, short-answer VQA and the expert-load analysis (see docs/evaluation.md).

``python -m moe_llava.evaluate experiment=... stage=stage3`` runs it all on a stage's export;
the pieces below also work on their own (e.g. scoring an answers file from another model).
"""

from moe_llava.evaluation.expert_load import (
    ExpertLoadRecorder,
    expert_load_metrics,
    expert_load_plot_data,
    plot_expert_load,
)
from moe_llava.evaluation.files import (
    Answer,
    EvalFileError,
    Question,
    answers_by_id,
    read_answers,
    read_questions,
)
from moe_llava.evaluation.pairing import Pairing, pair_answers
from moe_llava.evaluation.pope import POPE_SPLITS, PopeCounts, mean_f1, pope_yes_no, score_pope
from moe_llava.evaluation.vqa import normalize_answer, score_vqa

__all__ = [
    "POPE_SPLITS",
    "Answer",
    "EvalFileError",
    "ExpertLoadRecorder",
    "Pairing",
    "PopeCounts",
    "Question",
    "answers_by_id",
    "expert_load_metrics",
    "expert_load_plot_data",
    "mean_f1",
    "normalize_answer",
    "pair_answers",
    "plot_expert_load",
    "pope_yes_no",
    "read_answers",
    "read_questions",
    "score_pope",
    "score_vqa",
]
