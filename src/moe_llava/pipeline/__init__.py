"""The MoE-Tuning pipeline as DVC and Prefect run it: its parameter files (``params/``).

Modules: ``params`` (compose ``params/<stage>.yaml`` from ``conf/``), ``cli`` (``moe-llava pipeline``).
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "compose_stage": "moe_llava.pipeline.params",
    "write_params": "moe_llava.pipeline.params",
    "stale_params": "moe_llava.pipeline.params",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
