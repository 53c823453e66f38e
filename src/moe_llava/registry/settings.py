"""Registry settings: the composed Hydra defaults (``conf/registry/default.yaml``, ``conf/logger/``),
with explicit values (CLI flags) on top.

The tracking URI is resolved exactly as training does (:func:`moe_llava.tracking.tracking_uri`):
``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
directory. The registry lives in the same store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import field_validator

from moe_llava.errors import UserError
from moe_llava.registry.gate import GateSettings
from moe_llava.registry.model import PyfuncSettings
from moe_llava.schema import ConfigSection

DEFAULT_MODEL_NAME = "moe-llava"
DEFAULT_EXPERIMENT = "moe-tuning"


class RegistryConfig(ConfigSection):
    """The ``registry`` config group (``conf/registry/default.yaml``), checked: errors name the key."""

    KEY: ClassVar[str] = "registry"
    model_name: str = DEFAULT_MODEL_NAME
    gate: GateSettings = GateSettings()
    pyfunc: PyfuncSettings = PyfuncSettings()

    @field_validator("model_name", "gate", "pyfunc", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value


@dataclass
class RegistrySettings:
    model_name: str = DEFAULT_MODEL_NAME
    gate: GateSettings = field(default_factory=GateSettings)
    pyfunc: PyfuncSettings = field(default_factory=PyfuncSettings)
    experiment_name: str = DEFAULT_EXPERIMENT  # where a new `register` run goes
    logger: dict[str, Any] = field(default_factory=dict)  # the `logger` config group (artifact location...)
    tracking_uri: str | None = None  # None: resolved from `logger` and the environment

    def resolved_tracking_uri(self) -> str:
        from moe_llava.tracking import tracking_uri

        return self.tracking_uri or tracking_uri(self.logger)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RegistrySettings:
        """From a composed root config (``conf/config.yaml``: groups ``registry`` and ``logger``)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=False)
        registry = RegistryConfig.of(cfg.get("registry"))
        return cls(
            model_name=registry.model_name,
            gate=registry.gate,
            pyfunc=registry.pyfunc,
            experiment_name=str(cfg.get("experiment_name") or DEFAULT_EXPERIMENT),
            logger=dict(cfg.get("logger") or {}),
        )

    def with_overrides(
        self,
        *,
        model_name: str | None = None,
        gate_metric: str | None = None,
        gate_direction: str | None = None,
        min_margin: float | None = None,
        tracking_uri: str | None = None,
    ) -> RegistrySettings:
        gate = GateSettings(
            metric=gate_metric or self.gate.metric,
            direction=gate_direction or self.gate.direction,
            min_margin=self.gate.min_margin if min_margin is None else min_margin,
        )
        return dataclasses.replace(
            self,
            model_name=model_name or self.model_name,
            gate=gate,
            logger=dict(self.logger),
            tracking_uri=tracking_uri or self.tracking_uri,
        )


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The project's root config composed with Hydra overrides (e.g. ``experiment=tiny_cpu``), resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from moe_llava.paths import CONF_DIR

    if not (CONF_DIR / "config.yaml").is_file():
        if overrides:
            raise UserError(f"config overrides {list(overrides)} given, but {CONF_DIR} has no config.yaml")
        return {}
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its search path
        cfg = compose("config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    # Only what the registry reads, resolved (other groups may interpolate things it does not need).
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in ("registry", "logger", "experiment_name")
        if key in cfg
    }


def load_settings(overrides: Sequence[str] = (), **explicit: Any) -> RegistrySettings:
    """Composed defaults (+ Hydra ``overrides``), then ``explicit`` values (see ``with_overrides``)."""
    return RegistrySettings.from_config(compose_config(overrides)).with_overrides(**explicit)
