"""One of our MoE exports -> the released MoE-LLaVA layout (``moe-llava model convert --to reference``).

The result loads in the reference codebase (``moellava/model/builder.py``) and its evaluation
scripts: its ``config.json`` (flat LM fields, the LLaVA fields, the ``moe`` dict), sharded
safetensors under the reference's names, and the tokenizer. An export that was itself converted
from a released checkpoint (it has ``conversion.json``) gets back the fields we do not model
(``_name_or_path``, ``auto_map``, ``train_modules`` ...) and each tensor's stored dtype, so a round
trip released -> ours -> released gives the same tensors and config values.

The reference runs Qwen-1 and StableLM-2 tokenizers from their hub code (``tokenization_qwen.py``,
``tokenization_arcade100k.py``), which is not written here: the vocabulary file and the tokenizer
config naming the class are, and the two code files must be copied from the backbone's hub repo.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from moe_llava.errors import CheckpointError
from moe_llava.model.convert import configmap, keymaps
from moe_llava.model.convert.layout import (
    CONFIG,
    PlannedTensor,
    WeightFiles,
    read_json,
    write_safetensors_shards,
)
from moe_llava.model.convert.released import (
    CONVERSION,
    DEFAULT_MAX_SHARD,
    ConversionReport,
    _few,
    _Producer,
    parse_size,
    plan_shape,
    resolve_dtype,
)
from moe_llava.model.convert.tokenizer import TIKTOKEN_TOKENIZERS, tiktoken_class_of, write_tiktoken


def convert_to_reference(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ConversionReport:
    """Write our MoE export ``src`` into ``dst`` in the released layout (atomically)."""
    from moe_llava.atomic import write_dir
    from moe_llava.model.checkpoint import check_export_config

    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ours = check_export_config(src)
    provenance = read_json(src / CONVERSION, CONVERSION) if (src / CONVERSION).is_file() else {}
    source_config = provenance.get("source_config")
    try:
        backbone, released = configmap.ours_to_released(ours, source_config)
    except ValueError as err:
        raise CheckpointError(f"field {err!s}", file=src / CONFIG) from None
    cast = resolve_dtype(dtype)
    files = WeightFiles(src, allow_bin=False)
    ops, unmapped = keymaps.ours_to_released(backbone, list(files.infos))
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} weight(s) have no place in the released layout: {_few(unmapped)}", file=src
        )
    source_dtypes = provenance.get("source_dtypes") or {}

    with files.reader() as reader:
        if backbone == "phi" and keymaps.PHI_LM_HEAD_BIAS in files.infos:
            bias = reader.get(keymaps.PHI_LM_HEAD_BIAS)
            if bool(bias.any()):
                raise CheckpointError(
                    f"{keymaps.PHI_LM_HEAD_BIAS} is not zero, and the reference's Phi lm_head has no bias "
                    "(it was trained here: the released layout cannot hold this model)",
                    file=src,
                )
        producer = _Producer(reader.get)
        planned = []
        for op in ops:
            shape = plan_shape(op, files.infos)
            stored = files.infos[op.sources[0]].dtype
            if cast is not None and stored.is_floating_point and not op.is_router:
                out_dtype = cast
            elif op.target in source_dtypes and cast is None:
                out_dtype = getattr(torch, source_dtypes[op.target])
            else:
                out_dtype = stored
            planned.append(
                PlannedTensor(op.target, out_dtype, tuple(shape), producer.make(op, out_dtype, shape))
            )
        main = Counter(p.dtype for p in planned if p.dtype.is_floating_point).most_common(1)[0][0]
        released["torch_dtype"] = str(main).removeprefix("torch.")
        written = {}

        def save(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            weight_map = write_safetensors_shards(folder, planned, parse_size(max_shard_size))
            written["bytes"] = sum(p.nbytes for p in planned)
            if len(set(weight_map.values())) == 1:  # the reference's files are always sharded + indexed
                (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
                index = {"metadata": {"total_size": written["bytes"]},
                         "weight_map": dict.fromkeys(weight_map, "model-00001-of-00001.safetensors")}  # fmt: skip
                (folder / "model.safetensors.index.json").write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n"
                )
            (folder / CONFIG).write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")
            _write_tokenizer(src, folder, provenance.get("source_tokenizer_class"))

        write_dir(dst, save, "reference-layout checkpoint")
    return ConversionReport(
        source=str(src),
        target=str(dst),
        backbone=backbone,
        source_format="safetensors",
        tensors=len(planned),
        bytes_written=written["bytes"],
        dtypes=dict(Counter(str(p.dtype).removeprefix("torch.") for p in planned)),
        seconds=time.perf_counter() - started,
        notes=[],
    )


def _write_tokenizer(src: Path, folder: Path, tokenizer_class: str | None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    if tokenizer_class not in TIKTOKEN_TOKENIZERS:
        tokenizer_class = tiktoken_class_of(tokenizer)
    if tokenizer_class is None:
        tokenizer.save_pretrained(str(folder))
        return
    vocab_name, specials_of, _ = TIKTOKEN_TOKENIZERS[tokenizer_class]
    specials = specials_of()
    write_tiktoken(tokenizer, folder / vocab_name, specials)
    special_map = {
        key: getattr(tokenizer, key)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, key, None) in specials
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    config = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": tokenizer.model_max_length,
        **special_map,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
