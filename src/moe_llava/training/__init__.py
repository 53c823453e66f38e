"""MoE-Tuning stages 1/2/3 with Lightning, configured by Hydra, tracked in MLflow.

Names are imported lazily: light users of the package (``training.tracking`` from the registry
CLI) must not pay for importing Lightning, torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "moe_llava.training.validation",
    "configure_trainable": "moe_llava.training.stages",
    "load_stage_model": "moe_llava.training.stages",
    "resolve_stage_config": "moe_llava.training.run",
    "run_stage": "moe_llava.training.run",
    "validate_stage_config": "moe_llava.training.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
