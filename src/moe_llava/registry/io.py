"""Request rows of the pyfunc model: columns, image decoding, input tables (no MLflow needed)."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

IMAGE_COLUMN = "image"
PROMPT_COLUMN = "prompt"
ANSWER_COLUMN = "answer"
EXPORT_ARTIFACT = "export"  # the pyfunc model's artifact holding the stage export


def decode_image(image: Any, row: int = 0) -> Any:
    """A request's image cell -> what :class:`~moe_llava.inference.Answerer` takes (None, path, bytes).

    Base64 text is decoded here (any length: a long base64 string is never mistaken for a path).
    """
    if image is None or (isinstance(image, float) and image != image):  # None / NaN: text-only
        return None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if not isinstance(image, str):
        raise ValueError(f"row {row}: image must be a file path or base64 text, got {type(image).__name__}")
    text = image.strip()
    if not text:
        return None
    if not text.startswith("data:") and len(text) < 4096 and os.path.isfile(text):
        return text
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"row {row}: image {text[:60]!r} is neither an existing file nor base64-encoded image data"
        ) from None


def as_frame(model_input: Any):
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        values = model_input.values()
        scalar = all(not isinstance(v, (list, tuple)) for v in values)
        return pd.DataFrame([model_input]) if scalar else pd.DataFrame(model_input)
    if isinstance(model_input, (list, tuple)):
        return pd.DataFrame(list(model_input))
    raise ValueError(f"unsupported input type {type(model_input).__name__}: expected a table of rows")
