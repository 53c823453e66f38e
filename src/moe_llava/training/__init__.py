"""MoE-Tuning stages 1/2/3 with Lightning, configured by Hydra, tracked in MLflow."""

from moe_llava.training.run import resolve_stage_config, run_stage
from moe_llava.training.stages import configure_trainable, load_stage_model
from moe_llava.training.validation import ConfigError, validate_stage_config

__all__ = [
    "ConfigError",
    "configure_trainable",
    "load_stage_model",
    "resolve_stage_config",
    "run_stage",
    "validate_stage_config",
]
