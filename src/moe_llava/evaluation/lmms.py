"""The lmms-eval adapter: ``lmms-eval --model moe_llava --model_args pretrained=DIR_OR_URI ...``.

Installed with the ``lmms-eval`` extra (``make setup-lmms`` -> ``.venv-lmms``); this module is the
only one of the package that imports ``lmms_eval`` (the entry point ``lmms_eval.models:moe_llava``
in pyproject.toml points at :func:`manifest`), so the main package never needs it.

The model is asked exactly as our own evaluation asks it (:mod:`moe_llava.inference`): the
export's conversation template, image preparation and greedy decoding, through
:class:`~moe_llava.inference.Answerer` (each image goes through the dataset's checks and
transforms). Requests are batched per generation settings (``max_new_tokens``, ``until``);
``until`` cuts the answer at the first stop string. Text-only documents (no visual) are asked
without an image. What the model cannot do is refused with an error naming the task: several
images (or a video) in one document, sampling or beam search, ``loglikelihood`` and multi-round
requests.

``model_args``: ``pretrained`` (an export folder, a stage folder holding ``export/``, or an
MLflow URI such as ``models:/moe-llava@champion``), ``dtype`` (float32 | bfloat16 | float16),
``device`` (auto | cpu | cuda[:N]), ``batch_size``, ``max_new_tokens`` (when a task sets none),
``tracking_uri`` (for MLflow URIs; default as training).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from moe_llava.inference import DEFAULT_MAX_NEW_TOKENS, Answerer, load_pretrained

logger = logging.getLogger(__name__)

MODEL_ID = "moe_llava"
# lmms-eval's generation_kwargs that greedy decoding satisfies whatever their value is.
IGNORED_KWARGS = ("top_p", "top_k", "num_return_sequences", "use_cache", "image_aspect_ratio")


def manifest() -> ModelManifest:
    """The entry point's payload: lmms-eval resolves ``--model moe_llava`` to :class:`MoELlavaLmms`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MoELlavaLmms")


class UnsupportedRequest(ValueError):
    """A request the model cannot answer; the message names the task."""


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"moe_llava model_args: {name} must be a positive integer, got {value!r}") from None
    if number < 1 or str(value).strip() not in (str(number), f"{number}.0"):
        raise ValueError(f"moe_llava model_args: {name} must be a positive integer, got {value!r}")
    return number


def generation_settings(gen_kwargs: dict[str, Any] | None, task: str, default_max_new_tokens: int):
    """``(max_new_tokens, until)`` of one request; sampling and beam search are refused."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise UnsupportedRequest(f"task {task!r}: until must be a string or a list of strings, got {until!r}")
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    max_new_tokens = default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if max_new_tokens < 1:
        raise UnsupportedRequest(f"task {task!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0) or 0)
    num_beams = int(kwargs.pop("num_beams", 1) or 1)
    if do_sample or temperature > 0 or num_beams > 1:
        raise UnsupportedRequest(
            f"task {task!r}: asks for sampling or beam search (do_sample={do_sample}, "
            f"temperature={temperature}, num_beams={num_beams}); the moe_llava model decodes greedily only"
        )
    for key in IGNORED_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        logger.warning("task %r: generation_kwargs %s are not used by moe_llava", task, sorted(kwargs))
    return max_new_tokens, tuple(u for u in until if u)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((i for stop in until if (i := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


def single_image(visuals: Any, task: str, doc_id: Any):
    """The one image of a document (None: a text-only document); several or a video are refused."""
    if visuals is None:
        return None
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if not visuals:
        return None
    if len(visuals) > 1:
        raise UnsupportedRequest(
            f"task {task!r}, doc {doc_id}: {len(visuals)} images in one document; "
            "the moe_llava model takes one image per question"
        )
    visual = visuals[0]
    if isinstance(visual, str) and not visual.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")):
        raise UnsupportedRequest(
            f"task {task!r}, doc {doc_id}: the visual {visual!r} is not an image (video and audio "
            "tasks are not supported by the moe_llava model)"
        )
    if isinstance(visual, dict):
        raise UnsupportedRequest(
            f"task {task!r}, doc {doc_id}: the visual is a {sorted(visual)} mapping (audio?), not an image"
        )
    return visual


class MoELlavaLmms(lmms):
    """MoE-LLaVA exports for lmms-eval (``is_simple``: a prompt string and the document's visuals)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        device: str | None = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from moe_llava.evaluation.runner import DTYPES, resolve_device
        from moe_llava.registry.model import local_export

        if kwargs:
            raise ValueError(f"moe_llava model_args: unknown arguments {sorted(kwargs)}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"moe_llava model_args: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.batch_size_per_gpu = _positive_int(
            1 if batch_size in (None, "auto") else batch_size, "batch_size"
        )
        self.default_max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.device = resolve_device(str(device or "auto"))
        with local_export(str(pretrained), tracking_uri=tracking_uri) as export:
            # the whole export (weights, tokenizer, image processor) is in memory after this
            self.loaded = load_pretrained(export, device=self.device, dtype=DTYPES[str(dtype)])
        self.pretrained = str(pretrained)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---------------------------------------------------------------- lmms-eval's interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in the order of ``requests``, batched per generation settings."""
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, Any, str, str]]] = {}
        for index, request in enumerate(requests):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            settings = generation_settings(gen_kwargs, task, self.default_max_new_tokens)
            doc = self.task_dict[task][split][doc_id]
            image = single_image(doc_to_visual(doc), task, doc_id)
            groups.setdefault(settings, []).append((index, image, ctx, f"{task}/{split}/doc {doc_id}"))
        answers: list[str | None] = [None] * len(requests)
        for (max_new_tokens, until), items in groups.items():
            answerer = Answerer(self.loaded, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
            texts = answerer.answer([(image, ctx) for _, image, ctx, _ in items], [n for *_, n in items])
            for (index, *_), text in zip(items, texts):
                answers[index] = cut_at_stop(text, until)
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        tasks = sorted({r.task_name for r in requests})
        raise UnsupportedRequest(
            f"task(s) {tasks}: loglikelihood requests (multiple-choice scoring) are not supported by the "
            "moe_llava model; use a generate_until variant of the task"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        tasks = sorted({r.task_name for r in requests})
        raise UnsupportedRequest(
            f"task(s) {tasks}: multi-round generation is not supported by the moe_llava model"
        )
