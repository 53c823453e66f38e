"""Reading released weight files and writing ours: streaming, and bad input refused in one line
naming the file and the field (a truncated shard, an index naming a missing file, a .bin holding
a pickle payload, which is never run)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe_llava.cli import main
from moe_llava.errors import CheckpointError
from moe_llava.model.convert import convert_released
from moe_llava.model.convert.layout import PlannedTensor, WeightFiles, write_safetensors_shards
from tests.model.convert.released_layout import released_config, vision_config, write_released


class RunsCode:
    """Unpickling this writes a file: proof that a pickle's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _convert_error(capsys, src, dst) -> str:
    code = main(["model", "convert", str(src), str(dst), "--vision-config", _vision_file(src)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and err.startswith("moe-llava: error: ")
    assert not dst.exists()
    return err


def _vision_file(src) -> str:
    file = src.parent / "vision.json"
    file.write_text(json.dumps(vision_config("clip")))
    return str(file)


def test_the_streaming_writer_shards_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 7) for i in range(5)} | {"b": torch.arange(3, dtype=torch.bfloat16)}
    planned = [PlannedTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    weight_map = write_safetensors_shards(tmp_path, planned, max_shard_bytes=6000)
    assert len(set(weight_map.values())) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    loaded = {}
    for shard in set(weight_map.values()):
        with safe_open(str(tmp_path / shard), "pt") as f:  # the library reads what we wrote
            assert f.metadata() == {"format": "pt"}
        loaded |= load_file(tmp_path / shard)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tensors_read_one_by_one_equal_the_stored_ones(tmp_path, fmt):
    src, state = write_released(tmp_path / "r", "phi", fmt=fmt, router_dtype=torch.bfloat16)
    files = WeightFiles(src)
    assert set(files.infos) == set(state)
    with files.reader() as reader:
        for name, value in state.items():
            got = reader.get(name)
            assert got.dtype == value.dtype and torch.equal(got, value), name


def test_a_truncated_shard_is_named_with_its_first_missing_tensor(tmp_path, capsys):
    src, _ = write_released(tmp_path / "r", "phi")
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = _convert_error(capsys, src, tmp_path / "out")
    assert str(shard) in err and "truncated: tensor '" in err


def test_an_index_naming_a_missing_file_is_refused(tmp_path, capsys):
    src, _ = write_released(tmp_path / "r", "phi")
    (src / "model-00002-of-00002.safetensors").unlink()
    err = _convert_error(capsys, src, tmp_path / "out")
    assert "model.safetensors.index.json: field 'weight_map." in err
    assert "names model-00002-of-00002.safetensors, which does not exist" in err


def test_a_bin_holding_a_pickle_payload_is_refused_and_never_run(tmp_path, capsys):
    src, state = write_released(tmp_path / "r", "qwen")
    marker = tmp_path / "payload-ran"
    shard = src / "pytorch_model-00001-of-00002.bin"
    first = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    keys = [k for k, v in first.items() if v == shard.name]
    torch.save({**{k: state[k] for k in keys}, "extra": RunsCode(marker)}, shard)
    err = _convert_error(capsys, src, tmp_path / "out")
    assert str(shard) in err and "refused" in err and "none of its code ran" in err
    assert not marker.exists()


def test_an_index_that_puts_a_key_in_the_wrong_shard_names_the_key(tmp_path):
    src, _ = write_released(tmp_path / "r", "phi")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00002.safetensors")
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"field 'weight_map.{key}': the index puts it in"):
        WeightFiles(src)


def test_unmapped_and_missing_tensors_are_named(tmp_path):
    config = released_config("stablelm")
    _, state = write_released(tmp_path / "base", "stablelm", config=config)
    extra = dict(
        state, **{"model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.mystery": torch.ones(2)}
    )
    src, _ = write_released(tmp_path / "extra", "stablelm", state=extra, config=config)
    with pytest.raises(CheckpointError, match=r"config.json does not describe: \['model.layers.0.mlp"):
        convert_released(src, tmp_path / "o1", vision_config=vision_config("clip"))
    unknown = dict(state, **{"model.video_tower.weight": torch.ones(2)})
    src, _ = write_released(tmp_path / "unknown", "stablelm", state=unknown, config=config)
    with pytest.raises(
        CheckpointError, match=r"no place in the converted model: \['model.video_tower.weight'\]"
    ):
        convert_released(src, tmp_path / "o2", vision_config=vision_config("clip"))
    missing = {
        k: v
        for k, v in state.items()
        if not k.startswith("model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.")
    }
    src, _ = write_released(tmp_path / "missing", "stablelm", state=missing, config=config)
    with pytest.raises(
        CheckpointError, match=r"which would stay random: \['language_model.model.layers.2.mlp.experts.3"
    ):
        convert_released(src, tmp_path / "o3", vision_config=vision_config("clip"))
