"""Image inputs of the shared answer path (`moe_llava.inference`)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, PngImagePlugin

from moe_llava.inference import _store_image, normalize_image
from tests.conftest import png_bomb


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
        (
            "not an image!",
            "row 2: image 'not an image!' is not an existing file or base64-encoded image data",
        ),
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
    with pytest.raises(ValueError, match=r"question #3: not an image file \(unknown format\)"):
        _store_image(b"\x00not a png", tmp_path, 3)
    with pytest.raises(ValueError, match="question #4: image file not found"):
        _store_image(tmp_path / "missing.png", tmp_path, 4)


def test_store_image_copies_files_and_data_as_they_are_after_a_full_decode(tmp_path):
    """Files and encoded data are stored byte for byte (no re-encoding); one that is corrupt past
    its header is still refused here, naming the question (the dataset would fall back to another)."""
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("note", "a chunk re-encoding drops")
    Image.new("RGB", (8, 8), (9, 8, 7)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    source = tmp_path / "src.png"
    source.write_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    assert (store / _store_image(str(source), store, 0)).read_bytes() == data
    assert (store / _store_image(data, store, 1)).read_bytes() == data
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 50])
    for image in (str(tmp_path / "cut.png"), data[: len(data) - 50]):
        with pytest.raises(ValueError, match=r"^question #2: corrupt or unreadable image"):
            _store_image(image, store, 2)
    assert sorted(p.name for p in store.iterdir()) == ["000000.png", "000001"]


@pytest.mark.parametrize("form", ["bytes", "base64", "data-url", "path"])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, form):
    """A few kB that would decode to 192 MB (over the pixel budget) or 588 MB (over Pillow's own
    limit): refused from the PNG header, naming the question, whatever form the image comes in."""
    for (width, height), message in [
        ((8000, 8000), "8000x8000 = 64000000 pixels exceeds the limit 40000000"),
        ((14000, 14000), "decompression bomb guard: Image size \\(196000000 pixels\\) exceeds limit"),
    ]:
        data = png_bomb(width, height)
        image = {
            "bytes": data,
            "base64": base64.b64encode(data).decode(),
            "data-url": "data:image/png;base64," + base64.b64encode(data).decode(),
            "path": tmp_path / "bomb.png",
        }[form]
        (tmp_path / "bomb.png").write_bytes(data)
        with pytest.raises(ValueError, match=f"^question #5: {message}"):
            _store_image(image, tmp_path, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.png"]  # nothing stored


def test_image_data_over_the_byte_limit_is_refused_before_decoding(tmp_path):
    data = png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    limit = len(data) - 1
    for image in (data, base64.b64encode(data).decode(), path, str(path)):
        with pytest.raises(
            ValueError, match=rf"^row 1: image data of about \d+ bytes exceeds the limit of {limit}"
        ):
            normalize_image(image, "row 1", max_bytes=limit)
    huge_text = "QUFB" * 1_000_000  # 4 MB of base64: refused from its length, never decoded
    with pytest.raises(ValueError, match="exceeds the limit of 1000 bytes"):
        normalize_image(huge_text, "row 1", max_bytes=1000)
    assert normalize_image(data, max_bytes=len(data)) == data
