"""ShapesWorld: the embedded, deterministic synthetic dataset (no downloads, runs on a CPU laptop)."""

from moe_llava.data.shapesworld.generator import GENERATOR_VERSION, ShapesWorldConfig, generate_shapesworld
from moe_llava.data.shapesworld.pope import POPE_SPLITS, ObjectStats, pope_questions
from moe_llava.data.shapesworld.vocab import COLOURS, SHAPES, all_objects

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "POPE_SPLITS",
    "SHAPES",
    "ObjectStats",
    "ShapesWorldConfig",
    "all_objects",
    "generate_shapesworld",
    "pope_questions",
]
