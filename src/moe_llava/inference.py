"""Answer questions about images with a trained model.

One implementation, used by evaluation (POPE/VQA answer files), the MLflow pyfunc model and
``moe-llava chat``: prompts are built by the same :class:`~moe_llava.data.dataset.LlavaDataset`
(generation mode) and :class:`~moe_llava.data.collator.LlavaCollator` (left padding) as training,
with the conversation template and image preparation stored in the model's config at export.
Decoding is greedy and routing deterministic, so answers are reproducible.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageIssue, read_image
from moe_llava.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class LoadedModel:
    """A model ready for generation, with the tokenizer and image processor exported beside it."""

    model: Any
    tokenizer: Any
    image_processor: Any

    @property
    def dataset_kwargs(self) -> dict[str, Any]:
        """LlavaDataset settings that make prompts exactly as this model was trained to read them."""
        config = self.model.config
        return {
            "template": config.conversation_template,
            "image_processor": self.image_processor,
            "num_image_tokens": self.model.num_image_tokens,
            "image_aspect": config.image_aspect,
            "pad_color": config.pad_color,
            "max_length": None,
            "generation": True,
            "max_fallbacks": 0,  # evaluation must fail on a bad record, never answer another one
        }


def load_pretrained(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a stage export (``save_pretrained`` dir: safetensors weights, tokenizer, image processor).

    Only this project's exports load (:func:`~moe_llava.model.checkpoint.load_export_model`), and no
    code shipped with the folder runs (``trust_remote_code=False``).
    """
    from transformers import AutoImageProcessor

    from moe_llava.data.tokenizer import load_tokenizer
    from moe_llava.model.checkpoint import load_export_model

    model = load_export_model(model_dir, dtype=dtype or torch.float32)
    model.to(device).eval()
    tokenizer = load_tokenizer(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=False)
    return LoadedModel(model, tokenizer, image_processor)


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel,
    dataset: Any,
    *,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool | str = False,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, str]]:
    """Greedy answers for every record of a generation-mode dataset: ``[{"question_id", "text"}]``.

    Results keep the dataset's order and carry each record's id, so callers pair them with
    questions by id. ``on_batch`` sees each collated batch before generation (e.g. to record routing).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from moe_llava.data.collator import LlavaCollator

    model, tokenizer = loaded.model, loaded.tokenizer
    collator = LlavaCollator.from_tokenizer(
        tokenizer, num_image_tokens=model.num_image_tokens, padding_side="left", return_ids=True
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = tokenizer.eos_token_id
    # Beyond its context a model answers nonsense, and attention memory grows with the square of it.
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    answers: list[dict[str, str]] = []
    bar = tqdm(
        total=len(dataset),
        desc=progress if isinstance(progress, str) else "generating",
        unit="q",
        disable=not progress,
    )
    try:
        for batch in loader:
            if on_batch is not None:
                on_batch(batch)
            for qid, length in zip(batch["ids"], batch["attention_mask"].sum(1).tolist()):
                if context is not None and length + max_new_tokens > context:
                    raise UserError(
                        f"{qid}: the prompt ({length} tokens, image tokens included) plus max_new_tokens "
                        f"({max_new_tokens}) exceeds the model's context of {context} tokens"
                    )
            pixel_values = batch["pixel_values"]
            new_tokens = model.generate(
                input_ids=batch["input_ids"].to(device),
                pixel_values=None if pixel_values is None else pixel_values.to(device, dtype),
                attention_mask=batch["attention_mask"].to(device),
                image_mask=batch["image_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=collator.pad_token_id,
            )
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(
                {"question_id": str(qid), "text": text.strip()} for qid, text in zip(batch["ids"], texts)
            )
            bar.update(len(texts))
    finally:
        bar.close()
    return answers


def question_record(question_id: str, image: str | None, prompt: str) -> dict[str, Any]:
    """A LLaVA-format generation record: one human turn, the image (if any) first."""
    value = f"{IMAGE_TOKEN}\n{prompt}" if image is not None and IMAGE_TOKEN not in prompt else prompt
    record: dict[str, Any] = {"id": question_id, "conversations": [{"from": "human", "value": value}]}
    if image is not None:
        record["image"] = image
    return record


class Answerer:
    """Answer free-form questions about images: what the MLflow model and ``moe-llava chat`` call.

    Images may be file paths, PIL images, raw bytes or base64 strings; they are written to a
    private temporary folder so that they go through exactly the dataset's image checks and transforms.
    An image over ``max_image_pixels`` is refused from its header, before its pixels are decoded.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = 8,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.loaded = loaded
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> Answerer:
        load_kwargs = {k: kwargs.pop(k) for k in ("device", "dtype") if k in kwargs}
        return cls(load_pretrained(model_dir, **load_kwargs), **kwargs)

    def answer(self, questions: Sequence[tuple[Any, str]], names: Sequence[str] | None = None) -> list[str]:
        """Answers to ``[(image or None, prompt), ...]``, in order; ``names`` label the questions in
        errors (default ``question #i``)."""
        from moe_llava.data.dataset import LlavaDataset

        if not questions:
            return []
        names = list(names) if names is not None else [f"question #{i}" for i in range(len(questions))]
        with tempfile.TemporaryDirectory(prefix="moe-llava-images-") as folder:
            records = [
                question_record(
                    names[i], _store_image(image, Path(folder), i, names[i], self.max_image_pixels), prompt
                )
                for i, (image, prompt) in enumerate(questions)
            ]
            dataset = LlavaDataset(
                records, self.loaded.tokenizer, image_folder=folder, **self.loaded.dataset_kwargs
            )
            answers = generate_answers(
                self.loaded, dataset, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens
            )
        by_id = {a["question_id"]: a["text"] for a in answers}
        return [by_id[name] for name in names]


def normalize_image(
    image: Any, label: str = "image", *, max_bytes: int | None = None, paths: bool = True
) -> Image.Image | bytes | str | None:
    """An image given as a path, PIL image, bytes or base64 text (data URLs too) -> None (no image),
    a path, bytes or a PIL image. ``label`` names the input in errors (e.g. ``"row 3"``); encoded
    image data over ``max_bytes`` is refused (base64 text before it is decoded). With ``paths=False``
    text is only ever base64: the file system is not looked at."""
    if image is None or (isinstance(image, float) and image != image):  # None / NaN: text-only
        return None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        _check_bytes(len(image), label, max_bytes)
        return bytes(image)
    if isinstance(image, Path) and paths:
        if not image.is_file():
            raise UserError(f"{label}: image file not found: {image}")
        _check_bytes(image.stat().st_size, label, max_bytes)
        return str(image)
    if not isinstance(image, str):
        raise UserError(
            f"{label}: image must be a path, PIL image, bytes or base64 text, got {type(image).__name__}"
        )
    text = image.strip()
    if not text:
        return None
    # os.path.isfile, not Path.is_file: long base64 text must not raise "file name too long"
    if paths and not text.startswith("data:") and os.path.isfile(text):
        return normalize_image(Path(text), label, max_bytes=max_bytes)
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    _check_bytes(len(payload) * 3 // 4, label, max_bytes)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        expected = "an existing file or base64-encoded image data" if paths else "base64-encoded image data"
        raise UserError(f"{label}: image {text[:60]!r} is not {expected}") from None


def _check_bytes(size: int, label: str, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"{label}: image data of about {size} bytes exceeds the limit of {max_bytes} bytes")


def _store_image(
    image: Any,
    folder: Path,
    index: int,
    label: str | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> str | None:
    """Put one image into ``folder``; returns its relative name (None: no image).

    Files and encoded data are decoded once here, in full, by :func:`~moe_llava.data.images.read_image`
    (which refuses one over ``max_pixels`` from its header: a decompression bomb never expands in
    memory), then stored byte for byte: re-encoding would cost more than the model's answer on a small
    model. The full decode is kept so that a corrupt image fails naming its question; the dataset would
    otherwise fall back to another record. PIL images are written as PNG (fast compression).
    """
    label = label or f"question #{index}"
    image = normalize_image(image, label)
    if image is None:
        return None
    try:
        if isinstance(image, bytes):
            read_image(io.BytesIO(image), "image data", max_pixels=max_pixels)
            stored = f"{index:06d}"
            (folder / stored).write_bytes(image)
        elif isinstance(image, str):
            read_image(image, image, max_pixels=max_pixels)
            stored = f"{index:06d}{Path(image).suffix}"
            shutil.copyfile(image, folder / stored)
        elif image.width * image.height > max_pixels:
            raise ImageIssue(
                "oversized_image", f"{image.width}x{image.height} pixels exceeds the limit {max_pixels}"
            )
        else:
            stored = f"{index:06d}.png"
            image.convert("RGB").save(folder / stored, compress_level=1)
    except ImageIssue as issue:
        raise UserError(f"{label}: {issue.detail}") from None
    except OSError as err:
        raise UserError(f"{label}: the image cannot be stored ({err})") from None
    return stored
