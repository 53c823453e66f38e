"""Model recipes (`conf/model/*.yaml`) by name, composed with Hydra so overrides work as on the command line."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from moe_llava.errors import UserError
from moe_llava.paths import CONF_DIR


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def load_recipe(name: str, overrides: list[str] | None = None) -> DictConfig:
    if name not in available_recipes():
        raise UserError(f"unknown model recipe model={name!r}; available: {available_recipes()}")
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])
