"""The promotion gate's rule, without MLflow: first model, better, worse, ties, margins, direction."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_llava.errors import ConfigError
from moe_llava.paths import CONF_DIR
from moe_llava.registry.gate import GateSettings, decide, load_metrics
from moe_llava.registry.model import PyfuncSettings
from moe_llava.registry.settings import RegistryConfig, RegistrySettings

F1 = "pope/mean_f1"


def test_first_model_becomes_champion_even_without_the_metric():
    decision = decide(GateSettings(), {"vqa/test/accuracy": 0.1})
    assert decision.promote and "no champion" in decision.reason


@pytest.mark.parametrize(
    ("new", "champion", "margin", "promote"),
    [
        (0.81, 0.80, 0.0, True),  # better
        (0.79, 0.80, 0.0, False),  # worse
        (0.80, 0.80, 0.0, False),  # exact tie stays challenger
        (0.805, 0.80, 0.01, False),  # better, but within the margin: a tie
        (0.81, 0.80, 0.01, False),  # gain == margin is not MORE than the margin
        (0.82, 0.80, 0.01, True),  # beyond the margin
    ],
)
def test_maximize_with_margin(new, champion, margin, promote):
    decision = decide(GateSettings(min_margin=margin), {F1: new}, "1", {F1: champion})
    assert decision.promote is promote, decision.reason
    assert decision.champion_version == "1" and decision.champion_value == champion and decision.value == new
    if not promote:
        assert "stays challenger" in decision.reason


def test_minimize_direction_and_another_metric():
    gate = GateSettings(metric="eval/wall_time_s", direction="minimize", min_margin=1.0)
    assert decide(gate, {"eval/wall_time_s": 10.0}, "3", {"eval/wall_time_s": 12.0}).promote
    assert not decide(gate, {"eval/wall_time_s": 11.5}, "3", {"eval/wall_time_s": 12.0}).promote
    assert not decide(gate, {"eval/wall_time_s": 13.0}, "3", {"eval/wall_time_s": 12.0}).promote
    assert GateSettings(direction="lower").direction == "minimize"


def test_metrics_that_cannot_be_compared_never_promote():
    gate = GateSettings()
    missing_new = decide(gate, {"vqa/test/accuracy": 0.9}, "1", {F1: 0.5})
    assert not missing_new.promote and "missing" in missing_new.reason
    missing_champion = decide(gate, {F1: 0.9}, "1", {"vqa/test/accuracy": 0.5})
    assert not missing_champion.promote and "cannot compare" in missing_champion.reason
    assert not decide(gate, {F1: float("nan")}, "1", {F1: 0.5}).promote
    assert not decide(gate, {F1: "n/a"}, "1", {F1: 0.5}).promote
    assert decide(gate, {F1: "0.9"}, "1", {F1: "0.5"}).promote  # tags come back as strings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direction": "up"}, "registry.gate.direction"),
        ({"min_margin": -0.1}, "registry.gate.min_margin"),
        ({"min_margin": "x"}, "registry.gate.min_margin"),
        ({"metric": ""}, "registry.gate.metric"),
    ],
)
def test_bad_gate_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GateSettings(**kwargs)


def test_load_metrics_from_dict_or_file_flattens_nested(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"pope/mean_f1": 0.7, "vqa": {"test": {"accuracy": 0.4}}}))
    assert load_metrics(path) == {"pope/mean_f1": 0.7, "vqa/test/accuracy": 0.4}
    assert load_metrics({"a/b": 1}) == {"a/b": 1}
    with pytest.raises(ValueError, match="does not exist"):
        load_metrics(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_metrics(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        ({"gate": {"min_margin": -0.1}}, "registry.gate.min_margin: must be a finite number >= 0, got -0.1"),
        ({"gate": {"direction": "up"}}, "registry.gate.direction: expected one of ['maximize', 'minimize']"),
        ({"gate": {"metrc": "x", "dirction": "max"}}, "registry.gate: unknown keys ['dirction', 'metrc']"),
        ({"pyfunc": {"max_rows": 0}}, "registry.pyfunc.max_rows: must be an integer >= 1, got 0"),
        ({"model": "x"}, "registry: unknown keys ['model']"),
    ],
)
def test_registry_config_errors_name_the_key(registry, message):
    with pytest.raises(ConfigError) as err:
        RegistrySettings.from_config({"registry": registry})
    assert str(err.value).startswith(message), str(err.value)


def test_the_settings_defaults_are_the_config_groups():
    composed = yaml.safe_load((CONF_DIR / "registry" / "default.yaml").read_text())
    assert RegistryConfig.of(composed) == RegistryConfig()  # the classes' defaults repeat no other value
    settings = RegistrySettings.from_config({"registry": {**composed, "gate": None}})
    assert settings.gate == GateSettings() and isinstance(settings.pyfunc, PyfuncSettings)
    assert settings.with_overrides(min_margin=0.5).gate.min_margin == 0.5
