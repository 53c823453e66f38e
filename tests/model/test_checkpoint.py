"""Loading exports and checkpoints: only this architecture, only safetensors, never a checkpoint's code."""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from moe_llava.cli import main
from moe_llava.data.tokenizer import load_tokenizer
from moe_llava.errors import CheckpointError
from moe_llava.model import MoELlavaConfig, MoELlavaForCausalLM
from moe_llava.model.builder import build_image_processor, build_language_model, build_vision_tower
from moe_llava.model.checkpoint import load_export_model
from tests.conftest import IMAGE_TOKEN_ID, tiny_llama_config, tiny_vision_config

REPO = Path(__file__).resolve().parents[2]


class WritesMarker:
    """Unpickling this writes a file: proof that a pickle was loaded (and its code run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_write, (self.path,))


def _write(path: str) -> str:
    with open(path, "w") as fh:
        fh.write("pickle code ran")
    return path


@pytest.fixture
def export(tiny_vlm, tmp_path):
    folder = tmp_path / "export"
    tiny_vlm.save_pretrained(folder)
    return folder


def _variant(export, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(export, folder)
    return folder


def test_an_export_loads_with_every_weight(export, tiny_vlm):
    model = load_export_model(export)
    assert isinstance(model, MoELlavaForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_vlm.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_pickle_posing_as_weights_is_refused_without_unpickling(export, tmp_path):
    marker = tmp_path / "MARKER"
    payload = {"weights": WritesMarker(marker)}
    disguised = _variant(export, tmp_path, "disguised")
    torch.save(payload, disguised / "model.safetensors")  # a torch pickle under the safetensors name
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file") as err:
        load_export_model(disguised)
    assert str(disguised / "model.safetensors") in str(err.value)
    bin_only = _variant(export, tmp_path, "bin-only")
    (bin_only / "model.safetensors").unlink()
    torch.save(payload, bin_only / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"only safetensors weights are loaded; found \['pytorch_model\.bin'\]"
    ):
        load_export_model(bin_only)
    assert not marker.exists(), "a pickle was unpickled"


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
def test_a_corrupt_weights_file_names_the_file(export, tmp_path, damage):
    folder = _variant(export, tmp_path, damage)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)), "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors file"):
        load_export_model(folder)


def test_another_architecture_or_shape_or_missing_weights_is_refused(export, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not a MoE-LLaVA model"):
        load_export_model(gpt2)
    wider = MoELlavaForCausalLM(
        MoELlavaConfig(
            vision_config=tiny_vision_config(),
            text_config=tiny_llama_config(hidden_size=64),
            image_token_id=IMAGE_TOKEN_ID,
        )
    )
    other_shapes = _variant(export, tmp_path, "other-shapes")
    save_file(wider.state_dict(), other_shapes / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weights do not match config\.json \(mismatched keys \["):
        load_export_model(other_shapes)
    partial = _variant(export, tmp_path, "partial")
    weights = load_file(export / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "projector" not in k},
        partial / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match=r"\(missing keys \['projector\.linear_1\.bias'"):
        load_export_model(partial)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"not a model export \(no config\.json\)"):
        load_export_model(tmp_path / "empty")


def test_chat_refuses_a_folder_that_is_not_one_of_ours_in_one_line(export, tmp_path, capsys):
    bin_only = _variant(export, tmp_path, "bin-only")
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    assert main(["chat", "--model", str(bin_only), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-llava: error: {bin_only}: no model.safetensors") and err.count("\n") == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["chat", "--model", str(tmp_path / "other"), "hi"]) == 2
    assert "model_type 'bert' is not a MoE-LLaVA model" in capsys.readouterr().err


def test_checkpoint_code_never_runs(tmp_path, monkeypatch):
    """A model folder whose config, tokenizer and image processor point at its own Python file
    (``auto_map``): every loader refuses it, even for a user who would answer yes to transformers'
    interactive "run the custom code?" prompt (``input`` answers "y" here). The file would write a
    marker on import."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "custom-code"
    folder.mkdir()
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('checkpoint code ran')\n"
    )
    auto = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps({"model_type": "custom-llm", "auto_map": auto}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Tok", "auto_map": {"AutoTokenizer": ["custom.Tok", None]}})
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Proc", "auto_map": {"AutoImageProcessor": "custom.Proc"}})
    )
    monkeypatch.setattr(builtins, "input", lambda *args, **kwargs: "y")
    spec = {"name_or_path": str(folder)}
    loaders = {
        "language model": lambda: build_language_model(spec, pretrained=True),
        "vision tower": lambda: build_vision_tower(spec, pretrained=True),
        "image processor": lambda: build_image_processor(spec, pretrained=True),
        "tokenizer": lambda: load_tokenizer(folder),
        "export": lambda: load_export_model(folder),
    }
    for name, load in loaders.items():
        with pytest.raises(ValueError, match=r"trust_remote_code|custom code|not a MoE-LLaVA model") as err:
            load()
        assert str(folder) in str(err.value), name
        assert not marker.exists(), f"the {name} loader ran the checkpoint's code"


def test_no_source_turns_on_remote_code_or_unpickling():
    """Every ``torch.load`` passes ``weights_only=True``; no call passes ``weights_only`` other than
    True or ``trust_remote_code`` other than False (a literal: never a variable that could be on)."""
    offences = []
    for path in sorted(p for folder in ("src", "flows", "tools") for p in (REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if ast.unparse(node.func) == "torch.load" and "weights_only" not in keywords:
                offences.append(f"{where}: torch.load without weights_only=True")
            for name, allowed in (("weights_only", True), ("trust_remote_code", False)):
                value = keywords.get(name)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is allowed):
                    offences.append(f"{where}: {name}={ast.unparse(value)}")
    assert not offences, offences
