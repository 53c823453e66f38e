"""The MLflow model (pyfunc, from code), the model registry with its promotion gate, and serving.

- :mod:`~moe_llava.registry.pyfunc_model`: the model's code file (``mlflow.models.set_model``);
- :mod:`~moe_llava.registry.model`: log a stage export as that pyfunc model;
- :mod:`~moe_llava.registry.gate`: does a new version beat the champion? (pure functions);
- :mod:`~moe_llava.registry.registry`: versions, aliases ``champion`` / ``challenger``, history;
- :mod:`~moe_llava.registry.workflow`: :func:`register_export`, what the pipeline and the CLI call;
- :mod:`~moe_llava.registry.cli`: ``moe-llava registry register|promote|rollback|show``.

Imports stay lazy here so that the pyfunc model and the CLI load only what they use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GateSettings",
    "ModelRegistry",
    "RegistrySettings",
    "decide",
    "load_settings",
    "log_pyfunc_model",
    "register_export",
]

_EXPORTS = {
    "GateSettings": "moe_llava.registry.gate",
    "decide": "moe_llava.registry.gate",
    "ModelRegistry": "moe_llava.registry.registry",
    "RegistrySettings": "moe_llava.registry.settings",
    "load_settings": "moe_llava.registry.settings",
    "log_pyfunc_model": "moe_llava.registry.model",
    "register_export": "moe_llava.registry.workflow",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
