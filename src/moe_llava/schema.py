"""Config sections as pydantic models whose every error is a :class:`~moe_llava.errors.ConfigError`
naming the key: ``registry.gate.min_margin: must be a finite number >= 0, got -0.1``.

A section subclasses :class:`ConfigSection` and sets ``KEY`` (its place in the composed config);
unknown keys are refused (``registry.pyfunc: unknown keys ['max_token']``), the objects are frozen,
and nested sections report their full key. A validator raises ``ValueError("must be ...")``: the
message after the key is the validator's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from moe_llava.errors import ConfigError


def config_error(err: ValidationError, prefix: str) -> ConfigError:
    """The first problem of ``err`` as a :class:`ConfigError` whose key is ``prefix`` + the field's path;
    unknown keys of one section are named together."""
    problems = err.errors()
    first = problems[0]
    path = ".".join([prefix, *(str(part) for part in first["loc"])])
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        unknown = sorted(
            str(p["loc"][-1]) for p in problems if p["type"] == "extra_forbidden" and p["loc"][:-1] == parent
        )
        return ConfigError(".".join([prefix, *(str(part) for part in parent)]), f"unknown keys {unknown}")
    if first["type"] == "value_error":  # a validator's ValueError: its message as written
        error = first["ctx"]["error"]  # a nested section's ConfigError already names its full key
        return error if isinstance(error, ConfigError) else ConfigError(path, str(error))
    if first["type"] == "missing":  # its input is the whole section: not worth printing
        return ConfigError(path, "is missing")
    message = first["msg"][:1].lower() + first["msg"][1:]
    return ConfigError(path, f"{message}, got {first['input']!r}")


class ConfigSection(BaseModel):
    """A config section: typed, frozen, unknown keys refused; errors are ConfigErrors named ``KEY.<field>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEY: ClassVar[str] = "config"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise config_error(err, self.KEY) from None

    @classmethod
    def of(cls, values: Mapping[str, Any] | Self | None) -> Self:
        """``values`` checked into a section (defaults for what is missing); a section is passed on as is."""
        return values if isinstance(values, cls) else cls(**dict(values or {}))
