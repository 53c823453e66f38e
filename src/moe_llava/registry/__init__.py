"""The MLflow model (pyfunc, from code), the model registry with its promotion gate, and serving.

- :mod:`~moe_llava.registry.pyfunc_model`: the model's code file (``mlflow.models.set_model``);
- :mod:`~moe_llava.registry.model`: log a stage export as that pyfunc model;
- :mod:`~moe_llava.registry.gate`: does a new version beat the champion? (pure functions);
- :mod:`~moe_llava.registry.registry`: versions, aliases ``champion`` / ``challenger``, history;
- :mod:`~moe_llava.registry.workflow`: :func:`register_export`, what the pipeline and the CLI call;
- :mod:`~moe_llava.registry.cli`: ``moe-llava registry register|promote|rollback|show``.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "GateSettings": "moe_llava.registry.gate",
    "decide": "moe_llava.registry.gate",
    "ModelRegistry": "moe_llava.registry.registry",
    "RegistrySettings": "moe_llava.registry.settings",
    "load_settings": "moe_llava.registry.settings",
    "log_pyfunc_model": "moe_llava.registry.model",
    "register_export": "moe_llava.registry.workflow",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
