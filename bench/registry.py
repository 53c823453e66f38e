"""Registered benchmark suites: name -> module path (imported lazily, so one broken suite cannot
break the others and ``--help`` stays fast).

A suite module provides ``NAME``, ``config_from_options(quick=False, **overrides)``,
``run(config, log=print) -> dict`` and ``format_table(result) -> str``; ``python -m bench`` runs
them in this order.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUITES: dict[str, str] = {
    "moe_layer": "bench.moe_layer",
    "training": "bench.training",
    "generation": "bench.generation",
    "data": "bench.data_pipeline",
    "e2e": "bench.e2e",
}


def load(name: str) -> ModuleType:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; available: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])
