"""moe-tuning: MoE-LLaVA training pipeline."""

__version__ = "0.1.0"
