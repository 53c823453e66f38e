"""ShapesWorld scenes: which objects appear together (a co-occurrence prior), where, and how they are drawn.

The prior makes the statistics realistic enough for POPE: object frequencies follow a Zipf law
over a seeded ranking (some objects are *popular*), and every object has a few *companions* that
it appears with far more often than chance (so "adversarial" negatives, the objects that most often
co-occur with the present ones, are meaningfully hard).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from moe_llava.data.shapesworld.vocab import (
    BACKGROUNDS,
    CLUTTER,
    CLUTTER_INDEX,
    COLOURS,
    SHAPES,
    all_objects,
    colour_index,
    palette,
    position_name,
)


@dataclass
class SceneObject:
    colour: str
    shape: str
    cx: float
    cy: float
    size: float  # diameter of the bounding circle, pixels
    angle: float  # rotation, degrees
    shade: int
    visible: float = 1.0  # fraction of the object's pixels not occluded

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def bbox(self) -> tuple[float, float, float, float]:
        r = self.size / 2
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)

    def to_dict(self, image_size: int) -> dict:
        x0, y0, x1, y1 = self.bbox()
        return {
            "name": self.name,
            "colour": self.colour,
            "shape": self.shape,
            "bbox": [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)],
            "center": [round(self.cx, 1), round(self.cy, 1)],
            "size": round(self.size, 1),
            "position": position_name(self.cx, self.cy, image_size),
            "visible": round(self.visible, 3),
        }


@dataclass
class Scene:
    objects: list[SceneObject]
    background: int
    clutter: list[tuple] = field(
        default_factory=list
    )  # ("line", x0, y0, x1, y1, grey) | ("dot", x, y, r, grey)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


class ObjectPrior:
    """Seeded object frequencies (Zipf over a random ranking) and companion pairs."""

    def __init__(
        self,
        seed: int,
        zipf_exponent: float = 1.0,
        companions_per_object: int = 2,
        companion_boost: float = 8.0,
    ):
        rng = random.Random(f"shapesworld-prior:{seed}")
        self.objects = all_objects()
        ranking = list(self.objects)
        rng.shuffle(ranking)
        self.rank = {name: r for r, name in enumerate(ranking)}
        self.weight = {name: 1.0 / (self.rank[name] + 1) ** zipf_exponent for name in self.objects}
        self.companions: dict[str, set[str]] = {name: set() for name in self.objects}
        for name in ranking:
            others = [o for o in self.objects if o != name and o not in self.companions[name]]
            need = max(0, companions_per_object - len(self.companions[name]))
            for other in rng.sample(others, need):
                self.companions[name].add(other)
                self.companions[other].add(name)
        self.companion_boost = companion_boost

    def sample_names(self, rng: random.Random, n: int, duplicate_prob: float) -> list[str]:
        names: list[str] = []
        for _ in range(n):
            if names and rng.random() < duplicate_prob:
                names.append(rng.choice(names))
                continue
            candidates = [o for o in self.objects if o not in names]
            weights = [
                self.weight[o]
                * (self.companion_boost if any(o in self.companions[p] for p in names) else 1.0)
                for o in candidates
            ]
            names.append(rng.choices(candidates, weights=weights, k=1)[0])
        return names

    def to_dict(self) -> dict:
        return {
            "popularity_rank": {name: self.rank[name] for name in self.objects},
            "companions": {name: sorted(self.companions[name]) for name in self.objects},
        }


@dataclass
class SceneSpec:
    """Geometry and difficulty knobs (a subset of ``ShapesWorldConfig``)."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    object_count_weights: tuple[float, ...] = (0.2, 0.3, 0.3, 0.2)
    min_object_frac: float = 0.2
    max_object_frac: float = 0.42
    occlusion_prob: float = 0.25
    min_visible: float = 0.55
    max_clutter: int = 5
    max_angle: float = 15.0
    duplicate_prob: float = 0.05


def sample_scene(rng: random.Random, prior: ObjectPrior, spec: SceneSpec) -> Scene:
    """Sample object names from the prior, then place them (retrying until every object is visible enough)."""
    counts = list(range(spec.min_objects, spec.max_objects + 1))
    weights = list(spec.object_count_weights[: len(counts)]) + [1.0] * max(
        0, len(counts) - len(spec.object_count_weights)
    )
    n = rng.choices(counts, weights=weights, k=1)[0]
    names = prior.sample_names(rng, n, spec.duplicate_prob)
    background = rng.randrange(len(BACKGROUNDS))
    clutter = _sample_clutter(rng, spec)
    while True:
        for _attempt in range(100):
            objects = _place(rng, names, spec)
            if objects is None:
                continue
            scene = Scene(objects, background, clutter)
            _measure_visibility(scene, spec.image_size)
            if all(o.visible >= spec.min_visible for o in objects):
                return scene
        names = names[:-1]  # too crowded: drop an object (one object alone always fits)


def _place(rng: random.Random, names: list[str], spec: SceneSpec) -> list[SceneObject] | None:
    size = spec.image_size
    objects: list[SceneObject] = []
    allow_overlap = rng.random() < spec.occlusion_prob
    for name in names:
        colour, shape = name.split(" ")
        for _try in range(30):
            d = rng.uniform(spec.min_object_frac, spec.max_object_frac) * size
            r = d / 2
            cx = rng.uniform(r + 1, size - r - 1)
            cy = rng.uniform(r + 1, size - r - 1)
            clear = all(_apart(o, colour, cx, cy, r, allow_overlap) for o in objects)
            if clear:
                angle = rng.uniform(-spec.max_angle, spec.max_angle)
                objects.append(SceneObject(colour, shape, cx, cy, d, angle, rng.randrange(3)))
                break
        else:
            return None
    return objects


def _apart(other: SceneObject, colour: str, cx: float, cy: float, r: float, allow_overlap: bool) -> bool:
    """Bounding circles disjoint; with overlap allowed, partial overlap of differently coloured objects."""
    distance = math.hypot(cx - other.cx, cy - other.cy)
    if distance > r + other.size / 2 + 1:
        return True
    return allow_overlap and other.colour != colour and distance > (r + other.size / 2) * 0.55


def _sample_clutter(rng: random.Random, spec: SceneSpec) -> list[tuple]:
    size = spec.image_size
    items: list[tuple] = []
    for _ in range(rng.randint(0, spec.max_clutter)):
        grey = rng.randrange(len(CLUTTER))
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            length, theta = rng.uniform(size * 0.1, size * 0.4), rng.uniform(0, math.pi)
            items.append(("line", x0, y0, x0 + length * math.cos(theta), y0 + length * math.sin(theta), grey))
        else:
            items.append(("dot", rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.8, 1.8), grey))
    return items


def shape_polygon(obj: SceneObject) -> list[tuple[float, float]] | None:
    """Polygon vertices of an object (None for a circle)."""
    r = obj.size / 2
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        pts = [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)]
    elif obj.shape == "triangle":
        pts = [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    elif obj.shape == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif obj.shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            theta = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(theta), rad * math.sin(theta)))
    elif obj.shape == "cross":
        a, b = 0.32, 0.95
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:  # pragma: no cover - vocabulary is fixed
        raise ValueError(f"unknown shape {obj.shape!r}")
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    return [(obj.cx + r * (x * c - y * s), obj.cy + r * (x * s + y * c)) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int) -> None:
    poly = shape_polygon(obj)
    if poly is None:
        r = obj.size / 2 * 0.9
        draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _measure_visibility(scene: Scene, size: int) -> None:
    """Visible fraction of each object given the drawing order (later objects occlude earlier ones)."""
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    areas = []
    for k, obj in enumerate(scene.objects):
        alone = Image.new("L", (size, size), 0)
        _draw_object(ImageDraw.Draw(alone), obj, 1)
        areas.append(max(1, alone.histogram()[1]))
        _draw_object(draw, obj, k + 1)
    histogram = ids.histogram()
    for k, obj in enumerate(scene.objects):
        obj.visible = histogram[k + 1] / areas[k]


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Draw the scene into an 8-bit palette image (small, lossless PNGs)."""
    img = Image.new("P", (size, size), scene.background)
    img.putpalette(palette())
    draw = ImageDraw.Draw(img)
    for item in scene.clutter:
        if item[0] == "line":
            _, x0, y0, x1, y1, grey = item
            draw.line((x0, y0, x1, y1), fill=CLUTTER_INDEX + grey, width=1)
        else:
            _, x, y, r, grey = item
            draw.ellipse((x - r, y - r, x + r, y + r), fill=CLUTTER_INDEX + grey)
    for obj in scene.objects:
        _draw_object(draw, obj, colour_index(obj.colour, obj.shade))
    return img


__all__ = [
    "COLOURS",
    "SHAPES",
    "ObjectPrior",
    "Scene",
    "SceneObject",
    "SceneSpec",
    "render_scene",
    "sample_scene",
]
