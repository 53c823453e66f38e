"""Image files: safe path resolution, guarded loading, aspect handling and the vision processor.

Every image goes through the vision tower's own ``transformers`` image processor. Before that, the
aspect policy makes it square:

* ``crop`` (stage 1): centre-crop to the shorter side;
* ``pad`` (stages 2/3, the reference's ``expand2square``): pad to the longer side with the
  processor's mean colour (or a configured colour), so no content is lost;
* ``none``: hand the image to the processor unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

# Pixel budget per image (decompression-bomb guard); Pillow's own warning threshold is ~89M.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
ASPECT_MODES = ("pad", "crop", "none")


class ImageIssue(Exception):
    """Why an image cannot be used; ``reason`` is one of the validation reason codes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def resolve_image_path(image_folder: str | Path | None, relpath: Any, *, follow_links: bool = True) -> Path:
    """Resolve ``relpath`` inside ``image_folder``; refuses anything that could escape it.

    Absolute paths, ``..`` components, and (with ``follow_links``) symlinks pointing outside the
    folder raise ``ImageIssue("unsafe_image_path")``. Without ``follow_links`` only the lexical checks
    run and the filesystem is not touched.
    """
    if not isinstance(relpath, str) or not relpath.strip():
        raise ImageIssue("malformed_record", f"image path must be a non-empty string, got {relpath!r}")
    if image_folder is None:
        raise ImageIssue("missing_image", "record has an image but no image folder is configured")
    posix = relpath.replace("\\", "/")
    if os.path.isabs(relpath) or posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ImageIssue(
            "unsafe_image_path", f"absolute image path {relpath!r} (must be relative to the image folder)"
        )
    if ".." in posix.split("/"):
        raise ImageIssue("unsafe_image_path", f"image path {relpath!r} escapes the image folder ('..')")
    folder = Path(image_folder)
    path = folder / posix
    if not follow_links:
        return path
    # symlinks (or a folder that is itself a link) must still land inside the real folder
    real_folder = folder.resolve()
    real = path.resolve()
    if real != real_folder and real_folder not in real.parents:
        raise ImageIssue("unsafe_image_path", f"image path {relpath!r} resolves outside the image folder")
    return path


def open_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, check: str = "full"
) -> Image.Image | None:
    """Open and check one image file; raises :class:`ImageIssue` with a validation reason.

    ``check``: ``full`` decodes the pixels (catches truncated files) and returns the RGB image;
    ``header`` only reads the header (fast, returns None); ``exists`` only checks the file exists.
    The pixel budget is checked from the header, *before* decoding.
    """
    path = Path(path)
    if not path.exists():
        raise ImageIssue("missing_image", f"image file not found: {path}")
    if not path.is_file():
        raise ImageIssue("unreadable_image", f"image path is not a regular file: {path}")
    if check == "exists":
        return None
    return read_image(path, str(path), max_pixels=max_pixels, check=check)


def read_image(
    source: str | Path | BinaryIO,
    name: str,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check: str = "full",
) -> Image.Image | None:
    """Decode an image file or in-memory data (``name`` labels it in messages), under the pixel budget;
    ``check`` as in :func:`open_image` (``full`` or ``header``)."""
    try:
        # (no warnings.catch_warnings here: it is not thread-safe; the pixel budget below is checked
        # from the header, and Pillow itself raises DecompressionBombError far above it)
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageIssue(
                    "oversized_image",
                    f"{width}x{height} = {width * height} pixels exceeds the limit {max_pixels}",
                )
            if width <= 0 or height <= 0:
                raise ImageIssue("unreadable_image", f"image has an empty size {width}x{height}")
            if check == "header":
                return None
            img.load()
            return img.convert("RGB")
    except ImageIssue:
        raise
    except UnidentifiedImageError:
        raise ImageIssue("not_an_image", f"not an image file (unknown format): {name}") from None
    except Image.DecompressionBombError as err:
        raise ImageIssue("oversized_image", f"decompression bomb guard: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data, permissions
        raise ImageIssue("unreadable_image", f"corrupt or unreadable image {name}: {err}") from None


def processor_mean_color(image_processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as an 8-bit RGB colour (CLIP: (122, 116, 104))."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    if isinstance(mean, (int, float)):
        mean = (mean, mean, mean)
    return tuple(round(float(m) * 255) for m in mean[:3])  # type: ignore[return-value]


def expand_to_square(image: Image.Image, color: Sequence[int]) -> Image.Image:
    """Pad to a square canvas of the longer side, image centred (the reference's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def center_crop_square(image: Image.Image) -> Image.Image:
    """Centre-crop to a square of the shorter side."""
    width, height = image.size
    if width == height:
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


class ImageTransform:
    """Aspect policy + the vision tower's ``transformers`` image processor: PIL images -> (N,3,H,W)."""

    def __init__(
        self, image_processor: Any, aspect: str = "pad", pad_color: Sequence[int] | None = None
    ) -> None:
        if aspect not in ASPECT_MODES:
            raise ValueError(f"image aspect must be one of {ASPECT_MODES}, got {aspect!r}")
        self.image_processor = image_processor
        self.aspect = aspect
        self.pad_color = tuple(pad_color) if pad_color is not None else processor_mean_color(image_processor)
        if len(self.pad_color) != 3 or not all(0 <= int(c) <= 255 for c in self.pad_color):
            raise ValueError(f"pad_color must be three 0-255 integers, got {pad_color!r}")

    def square(self, image: Image.Image) -> Image.Image:
        if self.aspect == "pad":
            return expand_to_square(image, self.pad_color)
        if self.aspect == "crop":
            return center_crop_square(image)
        return image

    def __call__(self, images: Sequence[Image.Image]):
        squared = [self.square(img.convert("RGB")) for img in images]
        out = self.image_processor(images=squared, return_tensors="pt")
        return out["pixel_values"]
