"""Registered benchmark suites: name -> module path (imported lazily, so one broken suite cannot
break the others and ``--help`` stays fast).

A suite module provides ``NAME``, ``config_from_options(quick=False, **overrides)``,
``run(config, log=print) -> dict`` and ``format_table(result) -> str``. Training and inference
suites (tokens/s and step time of the whole model against the dense model) are added here when
the training code exists.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUITES: dict[str, str] = {
    "moe_layer": "bench.moe_layer",
}


def load(name: str) -> ModuleType:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; available: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])
