"""Request rows of the pyfunc model: columns, image decoding, input tables (no MLflow needed)."""

from __future__ import annotations

from typing import Any

IMAGE_COLUMN = "image"
PROMPT_COLUMN = "prompt"
ANSWER_COLUMN = "answer"
EXPORT_ARTIFACT = "export"  # the pyfunc model's artifact holding the stage export


def decode_image(image: Any, row: int = 0) -> Any:
    """A request's image cell -> what :class:`~moe_llava.inference.Answerer` takes (None, path, bytes)."""
    from moe_llava.inference import normalize_image

    return normalize_image(image, f"row {row}")


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
