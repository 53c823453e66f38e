"""Benchmark metrics (``moe-llava eval benchmark``'s ``lmms/...``) on a registered version: merged
into its metrics, where the promotion gate reads them."""

from __future__ import annotations

import json

from moe_llava.evaluation import lmms_benchmark as bench
from tests.registry.conftest import new_model


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
    first = registry.register(new_model(logged_model)["model_uri"], {"pope/mean_f1": 0.8})
    assert first.decision.promote
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    assert bench.registered_version(f"models:/{model_name}@champion", client) == (model_name, first.version)
    assert bench.registered_version(f"models:/{model_name}/7", client) == (model_name, "7")
    assert bench.registered_version("/some/export", client) is None
    benchmark_run = client.create_run(client.get_run(logged_model["run_id"]).info.experiment_id)
    run_id = benchmark_run.info.run_id
    merged = registry.add_metrics(
        first.version, {"lmms/shapesworld_pope/f1": 0.5}, run_id=run_id, tags={"benchmark.run_id": run_id}
    )
    assert merged == {"pope/mean_f1": 0.8, "lmms/shapesworld_pope/f1": 0.5}
    merged = registry.add_metrics(first.version, {"lmms/shapesworld_pope/f1": 0.6}, run_id=run_id)
    assert merged == {"pope/mean_f1": 0.8, "lmms/shapesworld_pope/f1": 0.6}  # the later value wins
    mv = client.get_model_version(model_name, first.version)
    assert mv.tags["benchmark.run_id"] == run_id and not [k for k in mv.tags if k.startswith("metric")]
    assert client.get_run(run_id).data.metrics == {"lmms/shapesworld_pope/f1": 0.6}  # the benchmark run's
    worse = registry.register(new_model(logged_model)["model_uri"], {"lmms/shapesworld_pope/f1": 0.55})
    assert not worse.decision.promote and "worse" in worse.decision.reason
    better = registry.register(new_model(logged_model)["model_uri"], {"lmms/shapesworld_pope/f1": 0.7})
    assert better.decision.promote and registry.champion() == better.version


def test_a_version_registered_with_metric_tags_still_compares(tracking_uri, logged_model, model_name):
    """Versions registered before metrics went onto the logged model kept them in tags: the gate reads those."""
    from moe_llava.registry.registry import ModelRegistry

    registry = ModelRegistry(model_name, tracking_uri=tracking_uri)
    registry.client.create_registered_model(model_name)
    old = registry.client.create_model_version(
        model_name, source=logged_model["model_uri"], tags={"metrics": json.dumps({"pope/mean_f1": 0.7})}
    )
    registry.promote(old.version)
    assert registry.version_metrics(old.version) == {"pope/mean_f1": 0.7}
    worse = registry.register(new_model(logged_model)["model_uri"], {"pope/mean_f1": 0.6})
    assert not worse.decision.promote and worse.decision.champion_value == 0.7


def test_register_merges_several_metrics_files_later_ones_winning(tmp_path, monkeypatch, capsys):
    """`registry register --metrics eval/metrics.json --metrics bench/metrics.json`: one dict for the gate."""
    from moe_llava.cli import main
    from moe_llava.registry import workflow

    evaluation, benchmark = tmp_path / "eval.json", tmp_path / "bench.json"
    evaluation.write_text(json.dumps({"pope/mean_f1": 0.8, "lmms/gqa/exact_match": 0.1}))
    benchmark.write_text(json.dumps({"lmms/gqa/exact_match": 0.6, "lmms/mme/mme_perception_score": 1200.0}))
    seen = {}

    class Result:
        def as_dict(self):
            return {"ok": True}

    def fake_register(model_dir, metrics, **kwargs):
        seen.update(metrics)
        return Result()

    monkeypatch.setattr(workflow, "register_export", fake_register)
    argv = [
        "registry",
        "register",
        "--model-dir",
        str(tmp_path),
        "--metrics",
        str(evaluation),
        "--metrics",
        str(benchmark),
    ]
    assert main(argv) == 0
    assert seen == {"pope/mean_f1": 0.8, "lmms/gqa/exact_match": 0.6, "lmms/mme/mme_perception_score": 1200.0}
    assert (
        main(["registry", "register", "--model-dir", str(tmp_path), "--metrics", str(tmp_path / "none.json")])
        == 2
    )
    assert "none.json does not exist" in capsys.readouterr().err


def test_a_benchmark_of_a_registry_uri_logs_its_metrics_on_the_versions_model(
    tracking_uri, logged_model, model_name, tmp_path
):
    """`moe-llava eval benchmark --model models:/NAME@champion`'s tracking (lmms-eval itself not needed):
    the benchmark run's metrics are logged once, on the run and on the version's logged model."""
    from mlflow.tracking import MlflowClient

    from moe_llava.registry.registry import ModelRegistry

    registry = ModelRegistry(model_name, tracking_uri=tracking_uri)
    version = registry.register(new_model(logged_model)["model_uri"], {"pope/mean_f1": 0.8}).version
    out = tmp_path / "bench"
    (out / "lmms").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "table.txt").write_text("table\n")
    metrics = {"lmms/shapesworld_pope_random/f1": 0.65}
    run_id, registered = bench._track(
        f"models:/{model_name}@champion", ["shapesworld_pope_random"], metrics, out, tracking_uri,
        "benchmarks", {"lmms_eval_version": "0"}, None,
    )  # fmt: skip
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version(model_name, version)
    assert registered == version and mv.tags["benchmark.run_id"] == run_id
    assert client.get_run(run_id).data.metrics == metrics
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert [(m.key, m.run_id) for m in logged.metrics if m.key.startswith("lmms/")] == [
        ("lmms/shapesworld_pope_random/f1", run_id)
    ]
    assert registry.version_metrics(version) == {"pope/mean_f1": 0.8, **metrics}
