"""MoE-Tuning stages 1/2/3 with Lightning, configured by Hydra, tracked in MLflow (:mod:`moe_llava.tracking`).

Modules: ``run`` (one stage, end to end), ``stages`` (what each stage loads and trains),
``validation`` (the stage config's checks), ``datamodule``, ``lit_module``, ``callbacks``,
``loggers`` (MLflow through an outage), ``strategies`` (DDP, FSDP, DeepSpeed).
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "configure_trainable": "moe_llava.training.stages",
    "load_stage_model": "moe_llava.training.stages",
    "run_stage": "moe_llava.training.run",
    "validate_stage_config": "moe_llava.training.validation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
