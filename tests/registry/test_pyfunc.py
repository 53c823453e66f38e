"""The logged pyfunc model: from code, no pickles, signature + example, answers equal to the direct model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from moe_llava.errors import ConfigError
from moe_llava.registry.io import decode_image
from moe_llava.registry.model import PyfuncSettings, export_in_logged_model, resolve_export_dir
from tests.conftest import png_bomb
from tests.registry.conftest import MAX_NEW_TOKENS, image_base64


@pytest.fixture(scope="module")
def downloaded_model(logged_model, tracking_uri, tmp_path_factory) -> Path:
    mlflow.set_tracking_uri(tracking_uri)
    dst = tmp_path_factory.mktemp("downloaded")
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=logged_model["model_uri"], dst_path=str(dst))
    )


def test_logged_model_is_code_plus_safetensors_without_pickles(downloaded_model):
    files = [p.relative_to(downloaded_model).as_posix() for p in downloaded_model.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin", ".ckpt", ".joblib"))]
    mlmodel = yaml.safe_load((downloaded_model / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == "pyfunc_model.py"
    assert "python_model" not in pyfunc  # no cloudpickled PythonModel
    assert pyfunc["config"]["max_new_tokens"] == MAX_NEW_TOKENS
    export = export_in_logged_model(downloaded_model)
    assert export.relative_to(downloaded_model).as_posix() == "artifacts/export"
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in export.iterdir()
    }
    assert resolve_export_dir(downloaded_model) == export
    assert (downloaded_model / "pyfunc_model.py").is_file()  # the model code, copied verbatim
    assert (downloaded_model / "code" / "moe_llava" / "inference.py").is_file()

    signature = mlmodel["signature"]
    assert [c["name"] for c in json.loads(signature["inputs"])] == ["image", "prompt"]
    assert [c["name"] for c in json.loads(signature["outputs"])] == ["answer"]
    assert json.loads(signature["params"])[0]["name"] == "max_new_tokens"
    example = json.loads((downloaded_model / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image", "prompt"]
    requirements = (downloaded_model / "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements


@pytest.fixture(scope="module")
def pyfunc(logged_model, tracking_uri, images):
    """The logged model loaded through MLflow, allowed to read images in the test image folder."""
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(
        logged_model["model_uri"], model_config={"image_folder": str(images[2].parent)}
    )


def test_pyfunc_answers_equal_the_direct_model(pyfunc, answerer, images):
    model = pyfunc
    prompts = ["What shape is in the image?", "What color is the shape?", "Describe the image.", "Hello?"]
    direct = answerer.answer(
        [(images[0], prompts[0]), (images[1], prompts[1]), (images[2], prompts[2]), (None, prompts[3])]
    )
    assert len(set(direct[:3])) > 1, "the test model should answer differently per image"
    frame = pd.DataFrame(
        {
            "image": [
                image_base64(images[0]),  # base64
                "data:image/png;base64," + image_base64(images[1]),  # data URL
                images[2].name,  # a path in the model's image folder
                None,  # text-only
            ],
            "prompt": prompts,
        }
    )
    out = model.predict(frame)
    assert list(out.columns) == ["answer"]
    assert out["answer"].tolist() == direct
    # Request parameter: fewer new tokens -> a prefix-length answer from the same greedy decoding.
    short = model.predict(frame.iloc[:1], params={"max_new_tokens": 1})["answer"].tolist()
    assert len(short[0]) <= len(direct[0])
    # A real-sized image: base64 far longer than a path may be (inference's path check would raise).
    noise = Image.frombytes(
        "RGB", (96, 96), np.random.default_rng(0).integers(0, 256, 96 * 96 * 3, np.uint8).tobytes()
    )
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    big = base64.b64encode(buffer.getvalue()).decode("ascii")
    assert len(big) > 20_000
    assert model.predict(pd.DataFrame({"image": [big], "prompt": [prompts[0]]}))["answer"].tolist() == (
        answerer.answer([(buffer.getvalue(), prompts[0])])
    )
    # Records (what dataframe_records becomes) work as well.
    assert model.predict([{"image": image_base64(images[0]), "prompt": prompts[0]}])["answer"][0] == direct[0]


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="row 3: image 'not an image!'"):
        decode_image("not an image!", 3)
    assert decode_image(None) is None and decode_image(float("nan")) is None and decode_image("  ") is None
    assert decode_image("aGVsbG8=") == b"hello"
    long_text = "QUFB" * 5000  # longer than a file name may be: never treated as a path
    assert decode_image(long_text) == b"AAA" * 5000


def test_a_served_model_reads_files_only_inside_its_image_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    jpeg_base64 = base64.b64encode(jpeg.getvalue()).decode()
    assert jpeg_base64.startswith("/9j/")  # base64 that looks like an absolute path
    # Without an image folder a path is never opened, even of a file that exists on the server.
    with pytest.raises(ValueError, match=r"^row 0: image '/.+' is not base64-encoded image data$"):
        decode_image(str(tmp_path / "secret.png"), 0)
    assert decode_image(jpeg_base64, 0) == jpeg.getvalue()
    served = str(folder)
    assert decode_image("ok.png", 1, image_folder=served) == str(folder / "ok.png")
    assert decode_image(jpeg_base64, 1, image_folder=served) == jpeg.getvalue()
    for path, message in [
        (str(tmp_path / "secret.png"), "absolute image path"),
        ("../secret.png", "escapes the image folder"),
        ("link.png", "resolves outside the image folder"),
        ("missing.png", "image file not found"),
    ]:
        with pytest.raises(ValueError, match=f"^row 2: .*{message}"):
            decode_image(path, 2, image_folder=served)


def test_bad_requests_are_invalid_parameter_errors_naming_the_row(pyfunc, images):
    """What `mlflow models serve` answers with HTTP 400 (the REST test sends the same requests)."""
    from mlflow.exceptions import MlflowException

    good = image_base64(images[0])
    bomb = base64.b64encode(png_bomb(8000, 8000)).decode()
    cases = [
        ({"image": [good] * 5, "prompt": ["Q?"] * 5}, {}, "5 rows in one request exceed the limit of 4"),
        (
            {"image": [bomb], "prompt": ["Q?"]},
            {},
            "row 0: 8000x8000 = 64000000 pixels exceeds the limit 16000000",
        ),
        (
            {"image": ["QUFB" * 50_000], "prompt": ["Q?"]},
            {},
            "row 0: image data of about 150000 bytes exceeds",
        ),
        ({"image": [good, "../x.png"], "prompt": ["Q?"] * 2}, {}, "row 1: image path '../x.png' escapes"),
        ({"image": [good], "prompt": [" "]}, {}, "row 0: prompt must be a non-empty string"),
        (
            {"image": [good], "prompt": ["Q?"]},
            {"max_new_tokens": 0},
            "max_new_tokens must be an integer >= 1",
        ),
        (
            {"image": [good], "prompt": ["Q?"]},
            {"max_new_tokens": 100_000},
            "plus max_new_tokens (100000) exceeds",
        ),
        ({"image": [None], "prompt": ["word " * 3000]}, {}, "row 0: the prompt ("),
    ]
    for columns, params, message in cases:
        with pytest.raises(MlflowException) as err:
            pyfunc.predict(pd.DataFrame(columns), params=params)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE" and message in err.value.message, (
            err.value.message
        )


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"max_token": 8}, "registry.pyfunc: unknown keys ['max_token']"),
        ({"max_rows": 0}, "registry.pyfunc.max_rows: must be an integer >= 1, got 0"),
        ({"max_image_bytes": "10MB"}, "registry.pyfunc.max_image_bytes: must be an integer >= 1"),
        ({"image_folder": 3}, "registry.pyfunc.image_folder: must be a path or null, got 3"),
        ({"batch_size": True}, "registry.pyfunc.batch_size: must be an integer >= 1, got True"),
        ({"device": 0}, "registry.pyfunc.device: input should be a valid string, got 0"),
    ],
)
def test_pyfunc_config_errors_name_the_key(config, key):
    with pytest.raises(ConfigError) as err:
        PyfuncSettings.of(config)
    assert str(err.value).startswith(key)


def test_pyfunc_settings_are_typed_with_the_defaults_of_the_config_group():
    settings = PyfuncSettings.of({"max_rows": 4})
    assert settings.max_rows == 4 and settings.batch_size == 8 and settings.image_folder is None
    assert PyfuncSettings.of(settings) is settings  # a checked section is passed on as is
    with pytest.raises(ValidationError, match="frozen"):
        settings.max_rows = 5
