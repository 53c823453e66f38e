"""ShapesWorld for the data and end-to-end suites: the repository's ``data/shapesworld`` or a small
one generated once per process into a temporary folder (removed at exit)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from moe_llava.paths import REPO_ROOT

# Enough for a few batches of 32 per stage (about 190 stage-2 records), generated in about a second.
SMALL_WORLD = {"train_images": 96, "val_images": 8, "test_images": 16, "vqa_per_image": 1}
DEFAULT_ROOTS = (Path("data/shapesworld"), REPO_ROOT / "data" / "shapesworld")

_generated: dict[tuple, Path] = {}


def is_world(root: Path) -> bool:
    return (root / "instruct_train.json").is_file() and (root / "tokenizer").is_dir()


def existing_world() -> Path | None:
    """``data/shapesworld`` (working directory first, then the repository root) when it is there."""
    for root in DEFAULT_ROOTS:
        if is_world(root):
            return root.resolve()
    return None


def generated_world(sizes: dict | None = None) -> Path:
    """A ShapesWorld of ``sizes`` (default :data:`SMALL_WORLD`; None values: the generator's
    defaults), generated into a temporary folder once per process."""
    from moe_llava.data.shapesworld import generate_shapesworld

    sizes = dict(SMALL_WORLD if sizes is None else sizes)
    key = tuple(sorted(sizes.items()))
    if key not in _generated or not is_world(_generated[key]):
        folder = Path(tempfile.mkdtemp(prefix="bench-shapesworld-"))
        atexit.register(shutil.rmtree, folder, True)
        generate_shapesworld(folder / "shapesworld", sizes)
        _generated[key] = folder / "shapesworld"
    return _generated[key]


def resolve(data_root: str | None, generate: bool, full_size: bool = False) -> tuple[Path, str]:
    """(root, where it came from). ``generate``: always a generated world; otherwise ``data_root``,
    else the repository's, else a generated one (the generator's full default size when
    ``full_size``, else :data:`SMALL_WORLD`)."""
    if not generate:
        if data_root is not None:
            root = Path(data_root)
            if not is_world(root):
                raise ValueError(
                    f"data_root={data_root!r} is not a ShapesWorld (no instruct_train.json/tokenizer)"
                )
            return root.resolve(), f"given: {root}"
        root = existing_world()
        if root is not None:
            return root, f"repository data: {root}"
    if full_size and not generate:
        return generated_world({}), "generated (default ShapesWorld size): data/shapesworld is absent"
    return generated_world(), f"generated small ShapesWorld {SMALL_WORLD}"
