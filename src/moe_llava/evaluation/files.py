"""Question and answer files of the benchmarks: reading (strict: errors name the file, the line in
JSON Lines or the record index in a JSON array, and the field) and writing.

Question files are the public formats: POPE (JSON Lines with ``question_id``, ``image``, ``text``,
``label``) and LLaVA-style VQA files (``question_id``, ``image``, ``text``, reference ``answer``),
each optionally with LLaVA ``conversations``; a JSON array of such records works too. A record
without ``conversations`` becomes a one-turn prompt from ``text`` (plus an optional instruction
suffix such as the paper's "Answer the question using a single word or phrase.").

Answer files are JSON Lines with ``question_id`` and ``text`` (the LLaVA answers format; other
keys are kept but ignored). Answers are paired with questions by id, never by position.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_llava.data.manifest import ManifestEntry, iter_entries
from moe_llava.data.templates import GPT, HUMAN, ROLE_ALIASES
from moe_llava.errors import EvalFileError
from moe_llava.inference import question_record

POPE_LABELS = ("yes", "no")


@dataclass
class Question:
    """One benchmark question, ready for generation (``record``) and scoring (``label`` / ``answer``)."""

    question_id: str
    location: str  # "line N" (JSON Lines) or "record #i" (JSON array), for messages
    record: dict[str, Any]  # LLaVA generation record: id (= question_id), image, conversations
    text: str  # the question as asked (last human turn), for answer files
    label: str | None = None  # POPE: "yes" / "no"
    answer: str | None = None  # VQA: the reference answer
    category: str | None = None
    # the record as the file has it (e.g. ShapesWorld POPE's `object`, for data.eval.pope_groups)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def file_id(self) -> str | int:
        """The id as the question file has it (an integer stays an integer in answer files)."""
        for key in ("question_id", "id"):
            value = self.source.get(key)
            if (
                isinstance(value, (str, int))
                and not isinstance(value, bool)
                and str(value) == self.question_id
            ):
                return value
        return self.question_id


@dataclass
class Answer:
    question_id: str
    location: str
    text: str


def _entries(path: Path) -> Iterable[ManifestEntry]:
    for entry in iter_entries(path):
        if entry.error is not None:
            raise EvalFileError(entry.error, file=path, location=entry.location)
        if not isinstance(entry.record, dict):
            raise EvalFileError(
                f"a record must be a JSON object, got {type(entry.record).__name__}",
                file=path,
                location=entry.location,
            )
        yield entry


def _question_id(
    record: dict, path: Path, location: str, keys: tuple[str, ...] = ("question_id", "id")
) -> str:
    key = next((k for k in keys if k in record), keys[0])
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise EvalFileError(
            f"{key} must be a non-empty string or integer, got {value!r}",
            file=path,
            location=location,
            field=key,
        )
    return str(value)


def _with_suffix(text: str, suffix: str | None) -> str:
    if not suffix or text.rstrip().endswith(suffix.strip()):
        return text
    return f"{text.rstrip()}\n{suffix.strip()}"


def _last_turn(conversations: list[dict], role: str) -> str | None:
    turns = [t for t in conversations if ROLE_ALIASES.get(t.get("from")) == role]
    return turns[-1]["value"] if turns else None


def _check_conversations(value: Any, path: Path, location: str, qid: str) -> list[dict]:
    where = {"file": path, "location": location}
    if not isinstance(value, list) or not value:
        raise EvalFileError(
            f"question_id {qid!r}: conversations must be a non-empty list of turns",
            field="conversations",
            **where,
        )
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_ALIASES:
            raise EvalFileError(
                f"question_id {qid!r}: each turn needs 'from' in {sorted(ROLE_ALIASES)}",
                field=f"conversations[{i}].from",
                **where,
            )
        if not isinstance(turn.get("value"), str):
            raise EvalFileError(
                f"question_id {qid!r}: turn value must be a string",
                field=f"conversations[{i}].value",
                **where,
            )
    if ROLE_ALIASES[value[0]["from"]] != HUMAN:
        raise EvalFileError(
            f"question_id {qid!r}: the first turn must be a human question",
            field="conversations[0].from",
            **where,
        )
    return value


def parse_pope_label(value: Any, path: Path, location: str, qid: str, field: str = "label") -> str:
    """``yes`` / ``no`` from a POPE label (case and a trailing period are ignored)."""
    text = value.strip().rstrip(".").strip().lower() if isinstance(value, str) else None
    if text not in POPE_LABELS:
        raise EvalFileError(
            f"question_id {qid!r}: POPE label must be 'yes' or 'no', got {value!r}",
            file=path,
            location=location,
            field=field,
        )
    return text


def read_questions(
    path: str | Path,
    *,
    kind: str | None = None,
    prompt_suffix: str | None = None,
    limit: int | None = None,
) -> list[Question]:
    """All questions of a POPE (``kind="pope"``: a yes/no ``label`` is required) or VQA
    (``kind="vqa"``: a reference ``answer`` or final gpt turn is required) file, in file order.

    ``prompt_suffix`` is appended (on its own line) to questions built from ``text``; records with
    ``conversations`` are used as they are. ``limit`` keeps the first ``limit`` questions.
    """
    if kind not in (None, "pope", "vqa"):
        raise ValueError(f"kind must be 'pope', 'vqa' or None, got {kind!r}")
    path = Path(path)
    questions: list[Question] = []
    first_location: dict[str, str] = {}
    for entry in _entries(path):
        if limit is not None and len(questions) >= limit:
            break
        record, location = entry.record, entry.location
        qid = _question_id(record, path, location)
        if qid in first_location:
            raise EvalFileError(
                f"duplicate question_id {qid!r} (first on {first_location[qid]})",
                file=path,
                location=location,
                field="question_id",
            )
        first_location[qid] = location
        image = record.get("image")
        if image is not None and not (
            isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))
        ):
            raise EvalFileError(
                f"question_id {qid!r}: image must be a path (string) or a list of paths, got {image!r}",
                file=path,
                location=location,
                field="image",
            )
        gpt_answer = None
        if "conversations" in record:
            conversations = _check_conversations(record["conversations"], path, location, qid)
            prompt = {"id": qid, "conversations": conversations}
            if image is not None:
                prompt["image"] = image
            text = _last_turn(conversations, HUMAN) or ""
            gpt_answer = (
                _last_turn(conversations, GPT) if ROLE_ALIASES[conversations[-1]["from"]] == GPT else None
            )
        else:
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise EvalFileError(
                    f"question_id {qid!r}: a record without conversations needs a non-empty 'text'",
                    file=path,
                    location=location,
                    field="text",
                )
            text = _with_suffix(text, prompt_suffix)
            if isinstance(image, list):
                raise EvalFileError(
                    f"question_id {qid!r}: a record without conversations takes one image",
                    file=path,
                    location=location,
                    field="image",
                )
            prompt = question_record(qid, image, text)
        question = Question(qid, location, prompt, text, source=record)
        category = record.get("category")
        question.category = None if category is None else str(category)
        if kind == "pope":
            if "label" in record:
                question.label = parse_pope_label(record["label"], path, location, qid)
            elif "answer" in record:
                question.label = parse_pope_label(record["answer"], path, location, qid, "answer")
            elif gpt_answer is not None:
                question.label = parse_pope_label(gpt_answer, path, location, qid, "conversations")
            else:
                raise EvalFileError(
                    f"question_id {qid!r}: no 'label' (yes/no) to score against",
                    file=path,
                    location=location,
                    field="label",
                )
        elif kind == "vqa":
            reference = record.get("answer", gpt_answer)
            if isinstance(reference, (int, float)) and not isinstance(reference, bool):
                reference = str(reference)
            if not isinstance(reference, str):
                raise EvalFileError(
                    f"question_id {qid!r}: no reference answer (an 'answer' string or a final gpt turn)",
                    file=path,
                    location=location,
                    field="answer",
                )
            question.answer = reference
        questions.append(question)
    if not questions:
        raise EvalFileError("no questions", file=path)
    return questions


def read_answers(path: str | Path) -> list[Answer]:
    """Answers (``question_id``, ``text``) in file order; a repeated ``question_id`` is an error."""
    path = Path(path)
    answers: list[Answer] = []
    first_location: dict[str, str] = {}
    for entry in _entries(path):
        record, location = entry.record, entry.location
        qid = _question_id(record, path, location, keys=("question_id",))
        if qid in first_location:
            raise EvalFileError(
                f"duplicate answer for question_id {qid!r} (first on {first_location[qid]})",
                file=path,
                location=location,
                field="question_id",
            )
        first_location[qid] = location
        text = record.get("text")
        if not isinstance(text, str):
            raise EvalFileError(
                f"question_id {qid!r}: text must be a string, got {text!r}",
                file=path,
                location=location,
                field="text",
            )
        answers.append(Answer(qid, location, text))
    return answers


def answers_by_id(answers: Iterable[Answer | Mapping[str, Any]]) -> dict[str, str]:
    """``{question_id: text}`` from :class:`Answer` objects or ``{"question_id", "text"}`` dicts."""
    out: dict[str, str] = {}
    for answer in answers:
        if isinstance(answer, Answer):
            qid, text = answer.question_id, answer.text
        else:
            qid, text = str(answer["question_id"]), str(answer["text"])
        if qid in out:
            raise ValueError(f"duplicate answer for question_id {qid!r}")
        out[qid] = text
    return out


# ---------------------------------------------------------------------- atomic writes
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a private temporary name beside the target (same file system, so the rename is atomic);
    # opened normally, so the file gets the usual permissions (umask), unlike mkstemp's 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (readers never see a half-written file)."""
    _atomic_write(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
    _atomic_write(Path(path), text)
