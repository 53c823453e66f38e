"""Log a stage export as the MLflow pyfunc model, and find the export inside a logged model.

The logged model folder holds only files that are read, never unpickled:

```
MLmodel                      flavor python_function, loader mlflow.pyfunc.loaders.code_model,
                             signature, model_config (generation settings), artifacts
code/pyfunc_model.py         the model's definition ("models from code": mlflow.models.set_model)
code/moe_llava/              the package source the model runs (prepended to sys.path at load)
artifacts/export/            the stage export: model.safetensors, config.json, tokenizer, image processor
input_example.json, serving_input_example.json, requirements.txt, python_env.yaml, conda.yaml
```
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import BeforeValidator

import moe_llava
from moe_llava.errors import UserError
from moe_llava.registry.io import ANSWER_COLUMN, EXPORT_ARTIFACT, IMAGE_COLUMN, PROMPT_COLUMN
from moe_llava.schema import ConfigSection

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(moe_llava.__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"  # the logged model's name within its run


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    return value


def _path_or_none(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"must be a path or null, got {value!r}")
    return value


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]


class PyfuncSettings(ConfigSection):
    """``registry.pyfunc`` (defaults in ``conf/registry/default.yaml``): what the pyfunc model is logged
    with, its ``model_config``. A request over one of the limits is refused, naming the row (HTTP 400
    when served)."""

    KEY: ClassVar[str] = "registry.pyfunc"
    max_new_tokens: PositiveInt = 32  # default of the request parameter
    batch_size: PositiveInt = 8
    device: str = "auto"
    max_rows: PositiveInt = 32
    max_image_bytes: PositiveInt = 10_000_000  # encoded size of one image
    max_image_pixels: PositiveInt = 16_000_000  # width x height of one image, read from its header
    # a folder on the server whose images requests may name; None: data only
    image_folder: Annotated[str | None, BeforeValidator(_path_or_none)] = None


# Third-party distributions the pyfunc model imports (the moe_llava code travels in code/).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "tqdm",
)
EXAMPLE_PROMPT = "What shape is in the image?"


def signature(max_new_tokens: int = 32):
    """Input ``image`` (optional string: path or base64) and ``prompt``; output ``answer``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False), ColSpec("string", PROMPT_COLUMN)]),
        outputs=Schema([ColSpec("string", ANSWER_COLUMN)]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
    )


def example_image_base64(size: int = 32) -> str:
    """A small PNG (a red square on white), base64-encoded: the input example's image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example():
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [example_image_base64()], PROMPT_COLUMN: [EXAMPLE_PROMPT]})


def pip_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def resolve_export_dir(model_dir: str | Path) -> Path:
    """A stage export from: an export folder, a stage folder holding ``export/``, or a logged pyfunc
    model; its ``config.json`` must be a MoE-LLaVA config (another model's folder is refused)."""
    from moe_llava.model.checkpoint import check_export_config

    path = Path(model_dir)
    if (path / "config.json").is_file():
        export = path
    elif (path / "export" / "config.json").is_file():
        export = path / "export"
    elif (path / "MLmodel").is_file():
        export = export_in_logged_model(path)
    else:
        raise UserError(
            f"{path} is not a model export (no config.json), a stage folder (no export/) "
            f"or an MLflow model (no MLmodel)"
        )
    check_export_config(export)
    return export


def export_in_logged_model(model_path: str | Path) -> Path:
    """The ``export`` artifact's folder inside a downloaded pyfunc model (read from its MLmodel)."""
    model_path = Path(model_path)
    mlmodel = yaml.safe_load((model_path / "MLmodel").read_text()) or {}
    pyfunc = (mlmodel.get("flavors") or {}).get("python_function") or {}
    artifact = (pyfunc.get("artifacts") or {}).get(EXPORT_ARTIFACT) or {}
    relative = artifact.get("path")
    if not relative or not (model_path / relative / "config.json").is_file():
        raise UserError(f"{model_path} is an MLflow model without a MoE-LLaVA export artifact")
    return model_path / relative


def log_pyfunc_model(
    export_dir: str | Path,
    *,
    name: str = MODEL_NAME_IN_RUN,
    pyfunc_config: PyfuncSettings | Mapping[str, Any] | None = None,
    registered_model_name: str | None = None,
):
    """Log ``export_dir`` as the pyfunc model of the active MLflow run; returns MLflow's ``ModelInfo``.

    MLflow loads the model once on the input example while logging (serving-input validation),
    so a model that cannot answer fails loudly here rather than in serving.
    """
    import mlflow

    export_dir = resolve_export_dir(export_dir)
    config = PyfuncSettings.of(pyfunc_config)
    with tempfile.TemporaryDirectory(prefix="moe-llava-model-") as staging:
        # Stage under the name `export`, so the logged model reads artifacts/export whatever the
        # source folder is called; only the files the export needs (no stray caches).
        staged = Path(staging) / EXPORT_ARTIFACT
        shutil.copytree(export_dir, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        code = Path(staging) / "code"
        shutil.copytree(
            PACKAGE_DIR, code / "moe_llava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={EXPORT_ARTIFACT: str(staged)},
            code_paths=[str(code / "moe_llava")],
            model_config=config.model_dump(),
            signature=signature(config.max_new_tokens),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
        )


# MLflow model URIs (downloaded) as opposed to local export folders.
URI_SCHEMES = (
    "models:/",
    "runs:/",
    "mlflow-artifacts:/",
    "s3://",
    "gs://",
    "wasbs://",
    "http://",
    "https://",
)


@contextmanager
def local_export(model: str, *, tracking_uri: str | None = None) -> Iterator[Path]:
    """The export folder of ``model`` (local path or MLflow URI; URIs are downloaded to a temporary folder)."""
    if not model.startswith(URI_SCHEMES):
        yield resolve_export_dir(model)
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    from moe_llava.registry.settings import load_settings
    from moe_llava.tracking import require_server

    uri = tracking_uri or load_settings().resolved_tracking_uri()
    require_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="moe-llava-model-") as folder:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=folder)
        except MlflowException as err:
            raise UserError(f"cannot load {model} from {uri}: {err.message}") from None
        try:
            export = resolve_export_dir(path)
        except ValueError as err:  # the message names the download folder: lead with the URI
            raise UserError(f"{model} is not a MoE-LLaVA model: {err}") from None
        yield export
