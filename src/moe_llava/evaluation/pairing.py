"""Pair answers with questions by ``question_id`` (never by position), reporting what does not pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moe_llava.evaluation.files import Question

MAX_LISTED_IDS = 1000  # ids listed in a report; counts are always complete


@dataclass
class Pairing:
    pairs: list[tuple[Question, str]]  # in question order
    missing_ids: list[str] = field(default_factory=list)  # questions without an answer
    unknown_ids: list[str] = field(default_factory=list)  # answers to no known question

    def report(self) -> dict:
        """Counts and (up to :data:`MAX_LISTED_IDS`) ids of unpaired questions and answers."""
        return {
            "num_questions": len(self.pairs) + len(self.missing_ids),
            "num_answered": len(self.pairs),
            "num_missing": len(self.missing_ids),
            "missing_ids": self.missing_ids[:MAX_LISTED_IDS],
            "num_unknown": len(self.unknown_ids),
            "unknown_ids": self.unknown_ids[:MAX_LISTED_IDS],
        }


def pair_answers(questions: Sequence[Question], answers: Mapping[str, str]) -> Pairing:
    """Each question with its answer text; questions without one and answers to unknown ids are listed."""
    known = {q.question_id for q in questions}
    pairing = Pairing(pairs=[])
    for question in questions:
        text = answers.get(question.question_id)
        if text is None:
            pairing.missing_ids.append(question.question_id)
        else:
            pairing.pairs.append((question, text))
    pairing.unknown_ids = [qid for qid in answers if qid not in known]
    return pairing
