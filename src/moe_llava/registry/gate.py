"""The promotion gate: does a newly registered version beat the current champion?

Pure functions (no MLflow), so the rule is easy to read and to test:

- no champion yet -> the new version becomes champion;
- otherwise it must beat the champion on ``metric`` by **more than** ``min_margin`` in
  ``direction`` (maximize or minimize); a tie, or a gain within the margin, leaves it challenger;
- a value that cannot be compared (missing on either side, not a number) never promotes
  automatically: the decision says why, and ``moe-llava registry promote`` can still do it by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from moe_llava.errors import UserError
from moe_llava.schema import ConfigSection

DIRECTIONS = {"maximize": 1.0, "minimize": -1.0}
FLOAT_TOLERANCE = 1e-9
DIRECTION_ALIASES = {"higher": "maximize", "max": "maximize", "lower": "minimize", "min": "minimize"}


class GateSettings(ConfigSection):
    """``registry.gate``: the metric the gate compares, its direction and the margin to beat."""

    KEY: ClassVar[str] = "registry.gate"
    metric: str = "pope/mean_f1"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_margin: float = 0.0

    @field_validator("metric")
    @classmethod
    def _names_a_metric(cls, metric: str) -> str:
        if not metric:
            raise ValueError("must name a metric (e.g. pope/mean_f1)")
        return metric

    @field_validator("direction", mode="before")
    @classmethod
    def _known_direction(cls, direction: Any) -> str:
        name = DIRECTION_ALIASES.get(str(direction).lower(), str(direction).lower())
        if name not in DIRECTIONS:
            raise ValueError(f"expected one of {sorted(DIRECTIONS)}, got {direction!r}")
        return name

    @field_validator("min_margin", mode="before")
    @classmethod
    def _margin(cls, margin: Any) -> float:
        try:
            value = float(margin)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {margin!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return value


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    metric: str
    direction: str
    min_margin: float
    value: float | None
    champion_version: str | None = None
    champion_value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    settings: GateSettings,
    metrics: Mapping[str, Any],
    champion_version: str | None = None,
    champion_metrics: Mapping[str, Any] | None = None,
) -> GateDecision:
    """Should a version with ``metrics`` replace the champion (``champion_version``, ``champion_metrics``)?"""
    name = settings.metric
    value = metric_value(metrics, name)
    common = {"metric": name, "direction": settings.direction, "min_margin": settings.min_margin}
    if champion_version is None:
        return GateDecision(True, "no champion yet: the first model becomes champion", value=value, **common)
    champion_value = metric_value(champion_metrics or {}, name)
    common.update(champion_version=str(champion_version), champion_value=champion_value)
    if value is None:
        return GateDecision(
            False,
            f"gate metric {name!r} missing (or not a number) in this version's metrics: "
            f"stays challenger (promote by hand if intended)",
            value=None,
            **common,
        )
    if champion_value is None:
        return GateDecision(
            False,
            f"champion v{champion_version} has no value for gate metric {name!r}: cannot compare, "
            f"stays challenger (promote by hand if intended)",
            value=value,
            **common,
        )
    gain = (value - champion_value) * DIRECTIONS[settings.direction]
    # Metrics are decimal numbers stored as binary floats: 0.81 - 0.80 is 0.010000000000000009.
    # Differences within a relative 1e-9 count as equal, so margins and ties behave as written.
    tolerance = FLOAT_TOLERANCE * max(1.0, abs(value), abs(champion_value))
    better = "higher" if settings.direction == "maximize" else "lower"
    versus = f"{name} = {value:.6g} vs champion v{champion_version} {champion_value:.6g}"
    if gain - settings.min_margin > tolerance:
        return GateDecision(
            True,
            f"{versus}: {better} by {gain:.6g} > min_margin {settings.min_margin:g}",
            value=value,
            **common,
        )
    if abs(gain) <= tolerance:
        reason = f"{versus}: a tie"
    elif gain > 0:
        reason = (
            f"{versus}: {better} by only {gain:.6g}, not more than min_margin {settings.min_margin:g} (a tie)"
        )
    else:
        reason = f"{versus}: worse by {-gain:.6g}"
    return GateDecision(False, reason + ": stays challenger", value=value, **common)


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """``metrics[name]`` as a finite float, or None (missing, not a number, NaN)."""
    raw = metrics.get(name)
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_metrics(metrics: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """An evaluation's metrics: a dict, or the path of its ``metrics.json``; nested dicts are flattened.

    Keys are flat, ``/``-separated (``pope/mean_f1``, ``pope/random/f1``, ``vqa/test/accuracy``);
    a nested ``{"pope": {"mean_f1": ...}}`` is flattened to the same keys.
    """
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        if not path.is_file():
            raise UserError(f"metrics: {path} does not exist (expected an evaluation's metrics.json)")
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"metrics: {path} is not valid JSON ({err})") from None
    if not isinstance(metrics, Mapping):
        raise UserError(
            f"metrics: expected a JSON object of metric name -> value, got {type(metrics).__name__}"
        )
    return _flatten(metrics)


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k in metrics if (v := metric_value(metrics, k)) is not None}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
