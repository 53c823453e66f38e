"""The registry on a real SQLite MLflow store: gate on registration, promote, rollback, history, tags.

Versions share one logged pyfunc model (same weights) and differ by their metrics dicts.
After every operation the tests assert that a registry that had a champion still has one.
"""

from __future__ import annotations

import json

import pytest

from moe_llava.registry.registry import ALIAS_HISTORY_TAG, CHALLENGER, CHAMPION, HISTORY_TAG
from tests.registry.conftest import ChampionWatch, aliases_of, new_model

F1 = "pope/mean_f1"


def _register(watch: ChampionWatch, logged_model, f1: float | None, **extra):
    metrics = {} if f1 is None else {F1: f1}
    metrics.update(extra)
    model = new_model(logged_model)
    return watch(
        "register",
        model["model_uri"],
        metrics,
        run_id=model["run_id"],
        tags={"git_commit": "abc123", "data_hash": "d41d8", "stage": "stage3"},
    )


def test_gate_first_better_worse_tie(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)

    first = _register(watch, logged_model, 0.70)
    assert first.decision.promote and first.aliases == [CHAMPION]  # first model -> champion
    assert registry.challenger() is None

    better = _register(watch, logged_model, 0.75)
    assert better.decision.promote and registry.champion() == better.version
    assert aliases_of(registry, first.version) == set()

    worse = _register(watch, logged_model, 0.60)
    assert not worse.decision.promote
    assert registry.champion() == better.version and registry.challenger() == worse.version
    assert "worse" in worse.decision.reason

    tie = _register(watch, logged_model, 0.75)
    assert not tie.decision.promote and "tie" in tie.decision.reason
    assert registry.challenger() == tie.version  # the challenger alias moved on
    assert aliases_of(registry, worse.version) == set()
    assert registry.champion_history() == [first.version, better.version]


def test_gate_min_margin_direction_and_metric_are_configurable(make_registry, logged_model):
    registry = make_registry(metric="vqa/test/accuracy", direction="minimize", min_margin=0.05)
    watch = ChampionWatch(registry)
    first = _register(watch, logged_model, 0.9, **{"vqa/test/accuracy": 0.50})
    # The gate ignores pope/mean_f1 here: it compares vqa/test/accuracy, lower is better.
    within = _register(watch, logged_model, 0.99, **{"vqa/test/accuracy": 0.47})
    assert not within.decision.promote and "min_margin" in within.decision.reason
    beyond = _register(watch, logged_model, 0.10, **{"vqa/test/accuracy": 0.40})
    assert beyond.decision.promote and registry.champion() == beyond.version
    assert registry.champion_history() == [first.version, beyond.version]


def test_version_metrics_on_its_logged_model_few_tags_and_alias_history(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    first = _register(
        watch,
        logged_model,
        0.70,
        **{"pope/random/f1": 0.71, "eval/wall_time_s": 3.5, "moe/layer0/expert1_load": 0.25},
    )
    second = _register(watch, logged_model, 0.80)

    mv = registry.client.get_model_version(registry.model_name, first.version)
    tags = mv.tags
    metrics = {F1: 0.70, "pope/random/f1": 0.71, "eval/wall_time_s": 3.5, "moe/layer0/expert1_load": 0.25}
    # metrics are the logged model's (and the run's), every one, routing detail included
    assert registry.version_metrics(first.version) == metrics
    logged = registry.client.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == metrics
    assert registry.client.get_run(mv.run_id).data.metrics[F1] in (0.70, 0.80)  # the run holds both versions'
    # the version keeps the tags a person reads: no metric.* or metrics tag, no config
    assert not [k for k in tags if k.startswith("metric")] and "config" not in tags
    assert tags["git_commit"] == "abc123" and tags["data_hash"] == "d41d8" and tags["stage"] == "stage3"
    assert tags["gate.decision"] == "champion" and tags["gate.reason"].startswith("no champion yet")
    assert mv.run_id == logged_model["run_id"]
    assert mv.source.removeprefix("models:/") == logged.model_id != logged_model["model_id"]

    events = json.loads(tags[ALIAS_HISTORY_TAG])
    assert [(e["alias"], e["action"]) for e in events] == [
        (CHALLENGER, "set"),
        (CHAMPION, "set"),
        (CHALLENGER, "removed"),  # a champion is no longer a challenger
        (CHAMPION, "removed"),  # replaced by the second version
    ]
    assert all(e["time"] and e["reason"] for e in events)
    assert events[-1]["replaced_by"] == second.version
    second_tags = registry.client.get_model_version(registry.model_name, second.version).tags
    assert "higher by" in second_tags["promotion_reason"] and second_tags["promoted_at"]
    model_tags = registry.client.get_registered_model(registry.model_name).tags
    assert json.loads(model_tags[HISTORY_TAG]) == [first.version, second.version]


def test_promote_by_hand_and_no_op_and_unknown_version(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    first = _register(watch, logged_model, 0.80)
    worse = _register(watch, logged_model, 0.50)
    assert registry.champion() == first.version and registry.challenger() == worse.version

    result = watch("promote", worse.version, "human judgement: better on the new data")
    assert result["changed"] and result["previous_champion"] == first.version
    assert registry.champion() == worse.version and registry.challenger() is None
    tags = registry.client.get_model_version(registry.model_name, worse.version).tags
    assert tags["promotion_reason"] == "human judgement: better on the new data"
    assert json.loads(tags[ALIAS_HISTORY_TAG])[-2]["by"] == "promote"

    assert not watch("promote", worse.version)["changed"]  # already champion: nothing moves
    with pytest.raises(ValueError, match="no version '99'"):
        watch("promote", "99")
    assert registry.champion_history() == [first.version, worse.version]


def test_rollback_twice_then_nothing_to_roll_back_to(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    with pytest.raises(ValueError, match="no registered model"):
        watch("rollback")
    v1 = _register(watch, logged_model, 0.60).version
    with pytest.raises(ValueError, match="nothing to roll back to"):
        watch("rollback", "only one champion so far")
    v2 = _register(watch, logged_model, 0.70).version
    v3 = _register(watch, logged_model, 0.80).version
    assert registry.champion_history() == [v1, v2, v3]

    result = watch("rollback", "v3 hallucinates on real data")
    assert result == {
        "changed": True,
        "champion": v2,
        "previous_champion": v3,
        "reason": "v3 hallucinates on real data",
    }
    assert registry.champion() == v2
    assert watch("rollback", "v2 too")["champion"] == v1  # the history goes further back
    assert registry.champion() == v1 and registry.champion_history() == [v1]
    with pytest.raises(ValueError, match="nothing to roll back to"):
        watch("rollback")
    assert registry.champion() == v1  # a refused rollback changes nothing

    v3_events = json.loads(registry.client.get_model_version(registry.model_name, v3).tags[ALIAS_HISTORY_TAG])
    assert v3_events[-1] == {
        "time": v3_events[-1]["time"],
        "alias": CHAMPION,
        "action": "removed",
        "reason": "rollback: v3 hallucinates on real data",
        "by": "rollback",
        "replaced_by": v2,
    }
    v2_tags = registry.client.get_model_version(registry.model_name, v2).tags
    assert v2_tags["promotion_reason"] == "rollback from v3: v3 hallucinates on real data"
    assert "rolled_back_at" in v2_tags

    # After rolling back, a new better version is judged against the restored champion.
    v4 = _register(watch, logged_model, 0.65)
    assert v4.decision.promote and v4.decision.champion_version == v1
    assert registry.champion_history() == [v1, v4.version]


def test_promoting_an_old_version_then_rolling_back_restores_the_one_before(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    v1 = _register(watch, logged_model, 0.60).version
    v2 = _register(watch, logged_model, 0.70).version
    watch("promote", v1, "v2 regressed in production")
    assert registry.champion_history() == [v1, v2, v1]
    assert watch("rollback")["champion"] == v2
    assert watch("rollback")["champion"] == v1


def test_alias_moved_outside_the_tool_is_adopted_into_the_history(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    v1 = _register(watch, logged_model, 0.60).version
    v2 = _register(watch, logged_model, 0.50).version
    registry.client.set_registered_model_alias(registry.model_name, CHAMPION, v2)  # e.g. in the MLflow UI
    assert registry.champion_history() == [v1, v2]
    assert watch("rollback")["champion"] == v1


def test_describe_lists_versions_aliases_and_gate_values(make_registry, logged_model):
    registry = make_registry()
    watch = ChampionWatch(registry)
    _register(watch, logged_model, 0.60)
    _register(watch, logged_model, 0.50)
    info = registry.describe()
    assert info["aliases"] == {CHAMPION: "1", CHALLENGER: "2"}
    assert [(r["version"], r["aliases"], r["gate_value"]) for r in info["versions"]] == [
        ("2", [CHALLENGER], 0.50),
        ("1", [CHAMPION], 0.60),
    ]
    assert info["champion_history"] == ["1"]
