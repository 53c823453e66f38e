"""Benchmark metrics (``moe-llava eval benchmark``'s ``lmms/...``) on a registered version: merged
into its metrics, where the promotion gate reads them."""

from __future__ import annotations

import json

from moe_llava.evaluation import lmms_benchmark as bench


def test_benchmark_metrics_merge_into_a_version_and_the_gate_can_use_them(
    tracking_uri, logged_model, model_name
):
    """A benchmark of the champion adds lmms/... to its version; a new version with a better
    lmms/... value then wins a gate configured on that metric."""
    from mlflow.tracking import MlflowClient

    from moe_llava.registry.gate import GateSettings
    from moe_llava.registry.registry import ModelRegistry

    gate = GateSettings(metric="lmms/shapesworld_pope/f1")
    registry = ModelRegistry(model_name, gate, tracking_uri=tracking_uri)
    first = registry.register(logged_model["model_uri"], {"pope/mean_f1": 0.8}, run_id=logged_model["run_id"])
    assert first.decision.promote
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    assert bench.registered_version(f"models:/{model_name}@champion", client) == (model_name, first.version)
    assert bench.registered_version(f"models:/{model_name}/7", client) == (model_name, "7")
    assert bench.registered_version("/some/export", client) is None
    merged = registry.add_metrics(
        first.version, {"lmms/shapesworld_pope/f1": 0.6}, tags={"benchmark.run_id": "r1"}
    )
    assert merged == {"pope/mean_f1": 0.8, "lmms/shapesworld_pope/f1": 0.6}
    tags = client.get_model_version(model_name, first.version).tags
    assert tags["metric.lmms/shapesworld_pope/f1"] == "0.6" and tags["benchmark.run_id"] == "r1"
    assert json.loads(tags["metrics"]) == merged
    worse = registry.register(logged_model["model_uri"], {"lmms/shapesworld_pope/f1": 0.55})
    assert not worse.decision.promote and "worse" in worse.decision.reason
    better = registry.register(logged_model["model_uri"], {"lmms/shapesworld_pope/f1": 0.7})
    assert better.decision.promote and registry.champion() == better.version
