"""moe-tuning: MoE-LLaVA training pipeline.

Packages: ``data``, ``model``, ``pretrain``, ``training``, ``evaluation``, ``registry``, ``pipeline``;
shared modules: ``errors`` (every exception type), ``tracking`` (MLflow: where runs go and the one run
lifecycle, :class:`~moe_llava.tracking.TrackedRun`), ``atomic`` (exports and checkpoints written whole
or not at all), ``inference``, ``paths``, ``cli`` (``moe-llava``).
"""

__version__ = "0.1.0"
