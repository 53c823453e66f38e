"""ShapesWorld vocabulary: colours, shapes, positions, and the fixed 8-bit palette."""

from __future__ import annotations

# name -> three shades (RGB); objects are drawn in one of the shades of their colour
COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((214, 39, 40), (190, 30, 45), (232, 60, 50)),
    "green": ((44, 160, 44), (30, 130, 60), (70, 180, 60)),
    "blue": ((31, 90, 200), (40, 60, 170), (50, 120, 220)),
    "yellow": ((240, 200, 20), (225, 185, 10), (250, 215, 60)),
    "purple": ((140, 70, 180), (120, 50, 150), (160, 90, 200)),
    "orange": ((245, 125, 15), (230, 110, 10), (250, 145, 40)),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS = {shape: shape + ("es" if shape.endswith("ss") else "s") for shape in SHAPES}

BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 246, 240),
    (234, 238, 245),
    (242, 236, 224),
    (252, 252, 252),
)
CLUTTER: tuple[tuple[int, int, int], ...] = (
    (196, 196, 196),
    (176, 176, 180),
    (160, 160, 168),
    (208, 202, 190),
)

# palette index layout: backgrounds, clutter greys, then colour shades in COLOURS order
BACKGROUND_INDEX = 0
CLUTTER_INDEX = len(BACKGROUNDS)
COLOUR_INDEX = CLUTTER_INDEX + len(CLUTTER)


def palette() -> list[int]:
    """Flat RGB palette for Pillow's ``P`` mode (unused entries black)."""
    colours = list(BACKGROUNDS) + list(CLUTTER) + [shade for shades in COLOURS.values() for shade in shades]
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def colour_index(colour: str, shade: int) -> int:
    return COLOUR_INDEX + list(COLOURS).index(colour) * 3 + shade


# 3x3 grid: (row, col) -> name, and the phrase used in captions/answers
POSITION_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


def all_objects() -> list[str]:
    """Every object name, ``"<colour> <shape>"``, in a fixed order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def position_name(cx: float, cy: float, size: int) -> str:
    col = min(2, int(3 * cx / size))
    row = min(2, int(3 * cy / size))
    return POSITION_NAMES[row][col]


NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
