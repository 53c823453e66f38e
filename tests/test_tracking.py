"""The one MLflow run lifecycle (TrackedRun): how a run ends, nesting, resuming, inert runs."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from moe_llava.errors import Terminated
from moe_llava.tracking import PARENT_RUN_ENV, TrackedRun, lock_hash, provenance_tags, resolve_parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")  # one SQLite store for the module: migrations take seconds


@pytest.fixture
def uri(store):
    return f"sqlite:///{store}/mlflow.db"


@pytest.fixture
def logger_cfg(store, uri):
    return {"tracking_uri": uri, "artifact_location": str(store / "mlartifacts")}


@pytest.fixture(autouse=True)
def no_active_run():
    yield
    while mlflow.active_run() is not None:  # a failing test must not leak its run into the next
        mlflow.end_run()


def _status(uri, run_id):
    return MlflowClient(uri).get_run(run_id).info.status


@pytest.mark.parametrize("fluent", [True, False])
def test_finished_with_params_metrics_tags_and_artifacts(logger_cfg, uri, tmp_path, fluent):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").write_text("{}")
    with TrackedRun.start(
        run_name="eval-stage3",
        experiment_name="exp",
        logger_cfg=logger_cfg,
        tags={"stage": "stage3", "skipped": None},
        fluent=fluent,
    ) as run:
        assert run.active and (mlflow.active_run() is not None) == fluent
        run.log_params({"evaluation": {"limit": 4, "benchmarks": ["pope"]}})
        run.log_metrics({"pope/mean_f1": 0.5, "eval/num_questions": 20})
        run.set_tags({"registry.version": "1"})
        run.log_text("# summary", "summary.md")
        run.log_artifacts(tmp_path / "out", "eval")
    assert not run.active and run.status == "FINISHED" and mlflow.active_run() is None
    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "eval-stage3"
    assert logged.data.params == {"evaluation.limit": "4", "evaluation.benchmarks": "['pope']"}
    assert logged.data.metrics == {"pope/mean_f1": 0.5, "eval/num_questions": 20}
    assert logged.data.tags["stage"] == "stage3" and "skipped" not in logged.data.tags
    assert logged.data.tags["registry.version"] == "1"
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"summary.md", "eval"}
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.name == "exp" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize("fluent", [True, False])
def test_failed_on_an_error_which_propagates(logger_cfg, uri, fluent):
    with (
        pytest.raises(RuntimeError, match="boom"),
        TrackedRun.start(run_name="s", experiment_name="exp", logger_cfg=logger_cfg, fluent=fluent) as run,
    ):
        raise RuntimeError("boom")
    assert _status(uri, run.run_id) == "FAILED" and mlflow.active_run() is None


@pytest.mark.parametrize("fluent", [True, False])
def test_killed_on_ctrl_c(logger_cfg, uri, fluent):
    with (
        pytest.raises(KeyboardInterrupt),
        TrackedRun.start(run_name="s", experiment_name="exp", logger_cfg=logger_cfg, fluent=fluent) as run,
    ):
        raise KeyboardInterrupt
    assert _status(uri, run.run_id) == "KILLED"


def test_killed_on_lightnings_exit_after_ctrl_c(logger_cfg, uri):
    """Lightning turns Ctrl-C inside `fit` into `sys.exit(1)` after its graceful shutdown."""
    run = TrackedRun.start(run_name="s", experiment_name="exp", logger_cfg=logger_cfg)
    with pytest.raises(SystemExit), run:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1) from None
    assert _status(uri, run.run_id) == "KILLED"


def test_killed_on_sigterm_and_the_handler_is_restored(logger_cfg, uri):
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    run = TrackedRun.start(run_name="s", experiment_name="exp", logger_cfg=logger_cfg)
    with pytest.raises(Terminated), run:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this returns
        pytest.fail("SIGTERM did not end the block")
    assert _status(uri, run.run_id) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_nested_under_a_parent_and_resumed(logger_cfg, uri, monkeypatch):
    with TrackedRun.start(
        run_name="pipeline", experiment_name="exp", logger_cfg=logger_cfg, fluent=False
    ) as parent:
        monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)
        assert resolve_parent() == parent.run_id and resolve_parent("explicit") == "explicit"
        with TrackedRun.start(
            run_name="stage1", experiment_name="exp", logger_cfg=logger_cfg, parent_run_id=resolve_parent()
        ) as child:
            child.log_params({"lr": 1})
        assert _status(uri, parent.run_id) == "RUNNING"  # a child ending leaves the parent open
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == parent.run_id
    assert _status(uri, parent.run_id) == "FINISHED"

    with TrackedRun.start(uri=uri, resume_run_id=child.run_id) as again:
        assert again.resumed and again.run_id == child.run_id and _status(uri, child.run_id) == "RUNNING"
        again.log_params({"lr": 2})  # params are immutable: a resumed run does not log them again
        again.log_metrics({"loss": 1.0}, step=3)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "1"}
    assert [m.step for m in client.get_metric_history(child.run_id, "loss")] == [3]


def test_a_client_run_leaves_the_global_tracking_uri_alone(logger_cfg, tmp_path):
    previous = mlflow.get_tracking_uri()
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)
    try:
        with TrackedRun.start(
            run_name="pipeline", experiment_name="exp", logger_cfg=logger_cfg, fluent=False
        ):
            assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(previous)


def test_an_inert_run_does_nothing(tmp_path):
    with TrackedRun.inert(resumed=True) as run:
        assert not run.active and run.run_id is None and run.resumed
        run.log_params({"a": 1})
        run.log_metrics({"m": 1.0})
        run.log_artifacts(tmp_path)
        run.log_dataset(tmp_path, "d", None, "training")
    assert run.status is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_lock_hash_is_the_sha256_of_the_lock_file_or_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_hash() == "absent"
    (tmp_path / "requirements.lock").write_text("torch==2.13.0 \\\n    --hash=sha256:00\n")
    assert lock_hash() == hashlib.sha256(b"torch==2.13.0 \\\n    --hash=sha256:00\n").hexdigest()


def test_more_params_and_metrics_than_one_mlflow_batch_holds(logger_cfg, uri):
    """MlflowClient.log_batch splits what it is given into MLflow's batches (100 params, 1000 metrics)."""
    params = {"p": {str(i): i for i in range(250)}, "long": "x" * 7000}
    metrics = {f"m{i}": float(i) for i in range(1500)}
    with TrackedRun.start(run_name="s", experiment_name="exp", logger_cfg=logger_cfg, fluent=False) as run:
        run.log_params(params)
        run.log_metrics(metrics, step=2)
    logged = MlflowClient(uri).get_run(run.run_id).data
    assert len(logged.params) == 251 and logged.params["p.249"] == "249"
    assert len(logged.params["long"]) == 6000 and logged.params["long"].endswith("...")  # MLflow's limit
    assert logged.metrics == metrics


def test_provenance_tags_are_one_set_for_every_run(tmp_path, monkeypatch):
    class Model:
        def __init__(self, moe):
            self.is_moe, self.config = moe is not None, type("Config", (), {"moe": moe})

    monkeypatch.chdir(tmp_path)  # no git checkout, no data.dvc, no lock here
    monkeypatch.setattr("moe_llava.tracking.provenance.git_commit", lambda: "c0ffee")
    assert provenance_tags() == {"git_commit": "c0ffee", "data_hash": None, "lock_hash": "absent"}
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: data\n")
    assert provenance_tags(Model({"num_experts": 4}))["moe"] == '{"num_experts": 4}'
    assert provenance_tags(Model(None))["data_hash"] == "abc.dir"
    assert provenance_tags(Model(None))["moe"] == "dense"
    inherited = provenance_tags(inherited={"git_commit": "1234", "lock_hash": "l0ck"})
    assert inherited == {"git_commit": "1234", "data_hash": "abc.dir", "lock_hash": "l0ck"}
