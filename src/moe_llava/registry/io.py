"""Request rows of the pyfunc model: columns, image decoding, input tables (no MLflow needed)."""

from __future__ import annotations

import re
from typing import Any

from moe_llava.errors import UserError

IMAGE_COLUMN = "image"
PROMPT_COLUMN = "prompt"
ANSWER_COLUMN = "answer"
EXPORT_ARTIFACT = "export"  # the pyfunc model's artifact holding the stage export
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")  # image paths have a '.' (the suffix), base64 text has none


def decode_image(
    image: Any, row: int = 0, *, image_folder: str | None = None, max_bytes: int | None = None
) -> Any:
    """A request's image cell -> what :class:`~moe_llava.inference.Answerer` takes (None, bytes, path).

    Base64 image data (``data:`` URLs too) is always accepted. A path is read only if the model was
    given an ``image_folder``, and only inside it (resolved like a dataset image: no absolute path, no
    ``..``, no symlink out of it); without one the server's files are never looked at, so a request
    can neither read nor probe them. Data over ``max_bytes`` is refused before it is decoded.
    """
    from moe_llava.data.images import ImageIssue, resolve_image_path
    from moe_llava.inference import normalize_image

    label = f"row {row}"
    text = image.strip() if isinstance(image, str) else ""
    if image_folder is not None and text and not text.startswith("data:") and not _BASE64.fullmatch(text):
        try:
            path = resolve_image_path(image_folder, text)
        except ImageIssue as issue:
            raise UserError(f"{label}: {issue.detail}") from None
        return normalize_image(path, label, max_bytes=max_bytes)
    return normalize_image(image, label, max_bytes=max_bytes, paths=False)


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
    raise UserError(f"unsupported input type {type(model_input).__name__}: expected a table of rows")
