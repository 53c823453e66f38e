"""`moe-llava chat` on a local export and on a models:/ URI: same answers as the model used directly."""

from __future__ import annotations

import io
import sys

import mlflow

from moe_llava.cli import main
from moe_llava.registry.gate import GateSettings
from moe_llava.registry.registry import ModelRegistry
from tests.conftest import png_bomb
from tests.registry.conftest import EXPERIMENT, MAX_NEW_TOKENS


class Echo(mlflow.pyfunc.PythonModel):
    """Some other team's MLflow model."""

    def predict(self, context, model_input, params=None):
        return model_input


TOKENS = ["--max-new-tokens", str(MAX_NEW_TOKENS)]


def test_chat_one_question_on_a_local_export(capsys, tiny_export, answerer, images):
    question = "What shape is in the image?"
    code = main(["chat", "--model", str(tiny_export), "--image", str(images[0]), *TOKENS, question])
    assert code == 0
    assert capsys.readouterr().out == answerer.answer([(images[0], question)])[0] + "\n"


def test_chat_reads_questions_from_stdin_until_eof(capsys, monkeypatch, tiny_export, answerer, images):
    questions = ["What shape is it?", "What color is it?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{questions[0]}\n\n  {questions[1]}  \n"))
    code = main(["chat", "--model", str(tiny_export.parent), "--image", str(images[1]), *TOKENS])
    assert code == 0  # a stage folder holding export/ works too
    expected = answerer.answer([(images[1], q) for q in questions])
    assert capsys.readouterr().out == "".join(a + "\n" for a in expected)


def test_chat_on_the_registry_champion(
    capsys, monkeypatch, tracking_uri, logged_model, model_name, answerer, images
):
    registry = ModelRegistry(model_name, GateSettings(), tracking_uri=tracking_uri)
    registry.register(logged_model["model_uri"], {"pope/mean_f1": 0.5}, run_id=logged_model["run_id"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # resolved as training resolves it
    question = "Is there a circle?"
    code = main(
        ["chat", "--model", f"models:/{model_name}@champion", "--image", str(images[2]), *TOKENS, question]
    )
    assert code == 0
    assert capsys.readouterr().out == answerer.answer([(images[2], question)])[0] + "\n"


def test_chat_errors_are_one_line(capsys, tmp_path, tiny_export, tracking_uri):
    assert main(["chat", "--model", str(tiny_export), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    assert "--image: " in capsys.readouterr().err
    code = main(["chat", "--model", "models:/no-such-model@champion", "--tracking-uri", tracking_uri, "hi"])
    assert code == 2 and "cannot load models:/no-such-model@champion" in capsys.readouterr().err


def test_chat_refuses_a_decompression_bomb_in_one_line(capsys, tmp_path, tiny_export):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(8000, 8000))
    assert main(["chat", "--model", str(tiny_export), "--image", str(bomb), "What is it?"]) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert (
        last_line == "moe-llava: error: question #0: 8000x8000 = 64000000 pixels exceeds the limit 40000000"
    )


def test_unknown_alias_version_or_foreign_model_uri_is_named(
    capsys, tmp_path, tracking_uri, logged_model, model_name
):
    registry = ModelRegistry(model_name, GateSettings(), tracking_uri=tracking_uri)
    registry.register(logged_model["model_uri"], {"pope/mean_f1": 0.5}, run_id=logged_model["run_id"])
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(EXPERIMENT).experiment_id):
        foreign = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    mlflow.register_model(foreign.model_uri, f"{model_name}-foreign")
    capsys.readouterr()  # MLflow's own logging so far
    cases = [
        (f"models:/{model_name}@production", "cannot load"),
        (f"models:/{model_name}/99", "cannot load"),
        (f"models:/{model_name}-foreign/1", "is not a MoE-LLaVA model"),
    ]
    for uri, message in cases:
        assert main(["chat", "--model", uri, "--tracking-uri", tracking_uri, "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moe-llava: error: {uri}") or f"cannot load {uri} " in err
        assert message in err and err.count("\n") == 1
