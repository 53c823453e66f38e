"""ShapesWorld: the embedded, deterministic synthetic dataset (no downloads, runs on a CPU laptop).

Modules: ``generator`` (images, captions, instructions, question files), ``scene``, ``text``,
``vocab`` (colours and shapes), ``pope`` (POPE questions from the object statistics).
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "GENERATOR_VERSION": "moe_llava.data.shapesworld.generator",
    "ShapesWorldConfig": "moe_llava.data.shapesworld.generator",
    "generate_shapesworld": "moe_llava.data.shapesworld.generator",
    "POPE_SPLITS": "moe_llava.data.shapesworld.pope",
    "ObjectStats": "moe_llava.data.shapesworld.pope",
    "pope_questions": "moe_llava.data.shapesworld.pope",
    "COLOURS": "moe_llava.data.shapesworld.vocab",
    "SHAPES": "moe_llava.data.shapesworld.vocab",
    "all_objects": "moe_llava.data.shapesworld.vocab",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
