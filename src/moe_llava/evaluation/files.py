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

from moe_llava.data.conversation import GPT, HUMAN, parse_conversation
from moe_llava.data.manifest import ManifestEntry, iter_entries
from moe_llava.errors import ConversationError, EvalFileError
from moe_llava.inference import question_record

POPE_LABELS = ("yes", "no")
QUESTION_KINDS = ("pope", "vqa", None)


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
    ``conversations`` are used as they are (they follow the turn rules of
    :mod:`moe_llava.data.conversation`, ending with a question or an answer). ``limit`` keeps the
    first ``limit`` questions.
    """
    if kind not in QUESTION_KINDS:
        raise ValueError(f"kind must be 'pope', 'vqa' or None, got {kind!r}")
    path = Path(path)
    questions: list[Question] = []
    first_location: dict[str, str] = {}
    for entry in _entries(path):
        if limit is not None and len(questions) >= limit:
            break
        at = _At(path, entry.location, _question_id(entry.record, path, entry.location))
        _check_first_use(at, first_location)
        questions.append(_question(entry.record, at, kind, prompt_suffix))
    if not questions:
        raise EvalFileError("no questions", file=path)
    return questions


@dataclass(frozen=True)
class _At:
    """Where a question is (file, ``line N`` / ``record #i``, id), for its error messages."""

    file: Path
    location: str
    qid: str

    def error(self, message: str, field: str) -> EvalFileError:
        return EvalFileError(
            f"question_id {self.qid!r}: {message}", file=self.file, location=self.location, field=field
        )


def _check_first_use(at: _At, first_location: dict[str, str]) -> None:
    if at.qid in first_location:
        raise EvalFileError(
            f"duplicate question_id {at.qid!r} (first on {first_location[at.qid]})",
            file=at.file,
            location=at.location,
            field="question_id",
        )
    first_location[at.qid] = at.location


def _question(record: dict, at: _At, kind: str | None, prompt_suffix: str | None) -> Question:
    """One question: its generation prompt, then what ``kind`` scores it against."""
    image = _image(record, at)
    if "conversations" in record:
        prompt, text, gpt_answer = _conversation_prompt(record["conversations"], image, at)
    else:
        prompt, text = _text_prompt(record, image, at, prompt_suffix)
        gpt_answer = None
    category = record.get("category")
    question = Question(
        at.qid, at.location, prompt, text, category=None if category is None else str(category), source=record
    )
    if kind == "pope":
        question.label = _pope_label(record, gpt_answer, at)
    elif kind == "vqa":
        question.answer = _reference_answer(record, gpt_answer, at)
    return question


def _image(record: dict, at: _At) -> Any:
    image = record.get("image")
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))
    ):
        raise at.error(f"image must be a path (string) or a list of paths, got {image!r}", "image")
    return image


def _conversation_prompt(conversations: Any, image: Any, at: _At) -> tuple[dict, str, str | None]:
    """The record's own conversation as the prompt; the question is its last human turn, and a
    final gpt turn is the reference answer."""
    try:
        turns = parse_conversation(conversations, ending=None)
    except ConversationError as err:
        raise at.error(err.detail, err.field) from None
    prompt = {"id": at.qid, "conversations": conversations}
    if image is not None:
        prompt["image"] = image
    text = next(turn.text for turn in reversed(turns) if turn.role == HUMAN)
    return prompt, text, turns[-1].text if turns[-1].role == GPT else None


def _text_prompt(record: dict, image: Any, at: _At, prompt_suffix: str | None) -> tuple[dict, str]:
    """A one-turn prompt from ``text`` (plus the suffix) and the record's one image."""
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise at.error("a record without conversations needs a non-empty 'text'", "text")
    if isinstance(image, list):
        raise at.error("a record without conversations takes one image", "image")
    text = _with_suffix(text, prompt_suffix)
    return question_record(at.qid, image, text), text


def _pope_label(record: dict, gpt_answer: str | None, at: _At) -> str:
    """The yes/no label: ``label``, else ``answer``, else the final gpt turn."""
    if "label" in record:
        return parse_pope_label(record["label"], at.file, at.location, at.qid)
    if "answer" in record:
        return parse_pope_label(record["answer"], at.file, at.location, at.qid, "answer")
    if gpt_answer is not None:
        return parse_pope_label(gpt_answer, at.file, at.location, at.qid, "conversations")
    raise at.error("no 'label' (yes/no) to score against", "label")


def _reference_answer(record: dict, gpt_answer: str | None, at: _At) -> str:
    """The VQA reference: ``answer`` (a number becomes its text), else the final gpt turn."""
    reference = record.get("answer", gpt_answer)
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str):
        raise at.error("no reference answer (an 'answer' string or a final gpt turn)", "answer")
    return reference


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
