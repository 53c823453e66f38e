"""Image inputs of the shared answer path (`moe_llava.inference`)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from moe_llava.inference import _store_image, normalize_image


def png_bytes(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_normalize_image_accepts_every_documented_form(tmp_path):
    data = png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    assert (
        normalize_image(None) is None
        and normalize_image(float("nan")) is None
        and normalize_image(" ") is None
    )
    assert normalize_image(str(path)) == str(path) and normalize_image(path) == str(path)
    assert normalize_image(data) == data and normalize_image(bytearray(data)) == data
    assert normalize_image(b64) == data
    assert normalize_image(f"data:image/png;base64,{b64}") == data
    assert normalize_image(b64[:40] + "\n" + b64[40:]) == data  # wrapped base64
    assert normalize_image("QUFB" * 5000) == b"AAA" * 5000  # longer than any file name: not a path


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("not an image!", "row 2: image 'not an image!' is neither an existing file nor base64"),
        (42, "row 2: image must be a path, PIL image, bytes or base64 text, got int"),
    ],
)
def test_normalize_image_errors_name_the_input(image, message):
    with pytest.raises(ValueError, match=message):
        normalize_image(image, "row 2")


def test_store_image_writes_a_png_or_names_the_bad_input(tmp_path):
    assert _store_image(None, tmp_path, 0) is None
    name = _store_image(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path, 1)
    assert Image.open(tmp_path / name).getpixel((0, 0)) == (1, 2, 3)
    name = _store_image(base64.b64encode(png_bytes((0, 255, 0))).decode(), tmp_path, 2)
    assert Image.open(tmp_path / name).convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ValueError, match="question #3: not a readable image"):
        _store_image(b"\x00not a png", tmp_path, 3)
    with pytest.raises(ValueError, match="question #4: image file not found"):
        _store_image(tmp_path / "missing.png", tmp_path, 4)
