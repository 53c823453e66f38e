"""The project's composed Hydra config, for code that is not a Hydra app (tests, bench, the pipeline).

``compose_config(["experiment=tiny_cpu", "stage=stage3"])`` is what
``python -m moe_llava.train experiment=tiny_cpu stage=stage3`` runs with; its ``model``, ``moe``,
``stage``, ``trainer`` ... nodes are the ones the stage instantiates.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from moe_llava.paths import CONF_DIR


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "config", resolve: bool = True
) -> DictConfig:
    """The root config (conf/config.yaml) composed with Hydra ``overrides``; interpolations resolved."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides))
    return resolved(cfg) if resolve else cfg


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every interpolation resolved (the config a run records and acts on)."""
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    return cfg
