"""Two processes register and promote on the same SQLite registry at once; the registry's lock.

The processes are real (``spawn``), start each phase on a barrier and share only the store. After
the race the aliases, the champion history and every version's alias history must tell one story.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import queue

import pytest

from moe_llava.errors import RegistryBusy
from moe_llava.registry.gate import GateSettings
from moe_llava.registry.registry import (
    ALIAS_HISTORY_TAG,
    CHALLENGER,
    CHAMPION,
    LOCK_SUFFIX,
    ModelRegistry,
)
from tests.registry.conftest import new_model

F1 = "pope/mean_f1"
# Per process, per round: interleaved so that most registrations are judged against a champion the
# other process has just set (or is setting). The best is 0.80; 0.79 would beat a stale 0.75.
SCORES = [[0.60, 0.70, 0.66, 0.80], [0.62, 0.68, 0.75, 0.79]]
PROCESS_TIMEOUT_S = 180


def _race(uri, model_name, logged_model, worker, barrier, results) -> None:
    """One racer: register its versions, then promote version 1 twice (as the other racer does)."""
    try:
        registry = ModelRegistry(model_name, GateSettings(), tracking_uri=uri)
        barrier.wait(timeout=120)
        registered = []
        for f1 in SCORES[worker]:
            model = new_model(logged_model, uri)
            result = registry.register(model["model_uri"], {F1: f1}, run_id=model["run_id"])
            registered.append((result.version, f1, result.decision.promote))
        barrier.wait(timeout=120)
        promoted = [registry.promote("1", f"racer {worker}")["changed"] for _ in range(2)]
        results.put((worker, registered, promoted, None))
    except BaseException as err:  # reported to the test, whatever it is
        barrier.abort()  # the other racer stops waiting
        results.put((worker, [], [], repr(err)))


def _events(registry: ModelRegistry, version: str, alias: str) -> list[str]:
    return [e["action"] for e in registry.alias_history(version) if e["alias"] == alias]


@pytest.mark.timeout(300)
def test_racing_registrations_and_promotions_leave_one_consistent_champion(
    tracking_uri, logged_model, model_name
):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(SCORES)), context.Queue()
    racers = [
        context.Process(target=_race, args=(tracking_uri, model_name, logged_model, w, barrier, results))
        for w in range(len(SCORES))
    ]
    for racer in racers:
        racer.start()
    try:
        outcomes = sorted(results.get(timeout=PROCESS_TIMEOUT_S) for _ in racers)
    except queue.Empty:
        pytest.fail(f"a racer did not finish within {PROCESS_TIMEOUT_S} s")
    finally:
        for racer in racers:
            racer.join(timeout=30)
            if racer.is_alive():
                racer.kill()
    assert [error for *_, error in outcomes] == [None, None]

    registry = ModelRegistry(model_name, tracking_uri=tracking_uri)
    scores = {version: f1 for _, registered, _, _ in outcomes for version, f1, _ in registered}
    assert sorted(scores, key=int) == [str(v) for v in range(1, 9)]
    # Phase 1 serialized: each registration was judged against the champion it replaced, so the
    # champions rose strictly and the best version won; phase 2 then moved the alias to v1 once.
    history = registry.champion_history()
    assert history[-1] == "1" == registry.champion()
    gate_champions = history[:-1]
    assert gate_champions[-1] == max(scores, key=scores.get)
    assert all(scores[a] < scores[b] for a, b in itertools.pairwise(gate_champions))
    promoted_by_gate = {v for _, registered, _, _ in outcomes for v, _, promote in registered if promote}
    assert promoted_by_gate == set(gate_champions)
    # Promoting the same version four times (two racers, twice each) changed the registry once.
    assert sorted(changed for _, _, promoted, _ in outcomes for changed in promoted) == [
        False,
        False,
        False,
        True,
    ]
    # Every version's alias history agrees with the aliases and the champion history.
    champion_sets = {v: _events(registry, v, CHAMPION).count("set") for v in scores}
    assert sum(champion_sets.values()) == len(history)
    assert {v for v in scores if _events(registry, v, CHAMPION)[-1:] == ["set"]} == {"1"}
    challengers = {v for v in scores if _events(registry, v, CHALLENGER)[-1:] == ["set"]}
    assert challengers == ({registry.challenger()} if registry.challenger() else set())
    tags = registry.client.get_model_version(model_name, "1").tags
    assert json.loads(tags[ALIAS_HISTORY_TAG])[-1]["reason"].startswith("racer ")
    assert not ModelRegistry(model_name + LOCK_SUFFIX, tracking_uri=tracking_uri).exists()  # released


def test_a_held_lock_makes_others_wait_then_fail_naming_the_holder(make_registry, logged_model):
    registry = make_registry()
    first = registry.register(new_model(logged_model)["model_uri"], {F1: 0.5})
    second = registry.register(new_model(logged_model)["model_uri"], {F1: 0.4})
    other = ModelRegistry(registry.model_name, tracking_uri=registry.client.tracking_uri, lock_wait_s=0.5)
    with registry.locked():
        with pytest.raises(RegistryBusy, match=rf"lock '{registry.model_name}\.lock' is held by .* pid \d+"):
            other.promote(second.version)
        assert registry.champion() == first.version  # nothing moved
    assert other.promote(second.version)["changed"] and registry.champion() == second.version
    assert not other.promote(second.version)["changed"]  # idempotent
    assert registry.champion_history() == [first.version, second.version]
