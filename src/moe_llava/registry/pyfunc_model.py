"""The MLflow pyfunc model of MoE-LLaVA, logged as *code* ("models from code"), never pickled.

MLflow copies this file into the logged model and runs it at load time; it declares the model
with :func:`mlflow.models.set_model`. The weights come from the model's artifact ``export`` (a
stage's ``save_pretrained`` folder: safetensors weights, config, tokenizer, image processor) and
are loaded by :mod:`moe_llava.inference`, the same code as evaluation and ``moe-llava chat``.

Input: a table with columns ``image`` (base64 image data, ``data:image/png;base64,...`` URLs
included, or, only for a model configured with an ``image_folder``, a path inside that folder; empty
for a text-only question) and ``prompt``. Output: a table with one column ``answer``, one row per
input row. Request parameter: ``max_new_tokens``.

A bad request (too many rows, an image too large or unreadable, a path outside the image folder, a
prompt beyond the model's context) raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``,
which ``mlflow models serve`` answers with HTTP 400 and the message naming the row.
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
        from moe_llava.registry.model import PyfuncSettings

        self.config = PyfuncSettings.of(context.model_config)
        device = str(self.config.device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.answerer = Answerer.from_pretrained(
            context.artifacts[EXPORT_ARTIFACT],
            device=device,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from mlflow.exceptions import MlflowException

        try:
            return pd.DataFrame({ANSWER_COLUMN: self._answer(model_input, params or {})})
        except ValueError as err:  # the request's fault: HTTP 400 with the message, not a 500
            raise MlflowException.invalid_parameter_value(str(err)) from None

    def _answer(self, model_input: Any, params: dict[str, Any]) -> list[str]:
        from moe_llava.inference import Answerer

        config = self.config
        frame = as_frame(model_input)
        if PROMPT_COLUMN not in frame.columns:
            raise ValueError(
                f"input needs a {PROMPT_COLUMN!r} column (and optionally {IMAGE_COLUMN!r}); "
                f"got columns {list(frame.columns)}"
            )
        if len(frame) > config.max_rows:
            raise ValueError(f"{len(frame)} rows in one request exceed the limit of {config.max_rows}")
        images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in frame.columns else [None] * len(frame)
        questions = []
        for row, (image, prompt) in enumerate(zip(images, frame[PROMPT_COLUMN].tolist())):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"row {row}: prompt must be a non-empty string, got {prompt!r}")
            image = decode_image(
                image, row, image_folder=config.image_folder, max_bytes=config.max_image_bytes
            )
            questions.append((image, prompt))
        # A fresh Answerer per call shares the loaded weights and keeps concurrent requests
        # with different max_new_tokens independent.
        answerer = Answerer(
            self.answerer.loaded,
            max_new_tokens=params.get("max_new_tokens", config.max_new_tokens),
            batch_size=config.batch_size,
            max_image_pixels=config.max_image_pixels,
        )
        return answerer.answer(questions, names=[f"row {row}" for row in range(len(frame))])


mlflow.models.set_model(MoELlavaPyfunc())
