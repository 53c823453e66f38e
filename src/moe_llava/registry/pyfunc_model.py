"""The MLflow pyfunc model of MoE-LLaVA, logged as *code* ("models from code"), never pickled.

MLflow copies this file into the logged model and runs it at load time; it declares the model
with :func:`mlflow.models.set_model`. The weights come from the model's artifact ``export`` (a
stage's ``save_pretrained`` folder: safetensors weights, config, tokenizer, image processor) and
are loaded by :mod:`moe_llava.inference`, the same code as evaluation and ``moe-llava chat``.

Input: a table with columns ``image`` (a file path readable by the server, or base64 image data,
``data:image/png;base64,...`` URLs included; empty for a text-only question) and ``prompt``.
Output: a table with one column ``answer``, one row per input row. Request parameter:
``max_new_tokens``.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from moe_llava.registry.io import (
    ANSWER_COLUMN,
    EXPORT_ARTIFACT,
    IMAGE_COLUMN,
    PROMPT_COLUMN,
    as_frame,
    decode_image,
)


class MoELlavaPyfunc(PythonModel):
    """Answers ``(image, prompt)`` rows with greedy decoding (deterministic)."""

    def load_context(self, context) -> None:
        import torch

        from moe_llava.inference import Answerer

        config = dict(context.model_config or {})
        device = str(config.get("device") or "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.max_new_tokens = int(config.get("max_new_tokens", 32))
        self.batch_size = int(config.get("batch_size", 8))
        self.answerer = Answerer.from_pretrained(
            context.artifacts[EXPORT_ARTIFACT],
            device=device,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from moe_llava.inference import Answerer

        frame = as_frame(model_input)
        if PROMPT_COLUMN not in frame.columns:
            raise ValueError(
                f"input needs a {PROMPT_COLUMN!r} column (and optionally {IMAGE_COLUMN!r}); "
                f"got columns {list(frame.columns)}"
            )
        images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in frame.columns else [None] * len(frame)
        questions = [
            (decode_image(image, row), str(prompt))
            for row, (image, prompt) in enumerate(zip(images, frame[PROMPT_COLUMN].tolist()))
        ]
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        # A fresh Answerer per call shares the loaded weights and keeps concurrent requests
        # with different max_new_tokens independent.
        answerer = Answerer(self.answerer.loaded, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        return pd.DataFrame({ANSWER_COLUMN: answerer.answer(questions)})


mlflow.models.set_model(MoELlavaPyfunc())
