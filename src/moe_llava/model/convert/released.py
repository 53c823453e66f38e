"""Released MoE-LLaVA checkpoint -> one of our exports (``moe-llava model convert SRC DST``).

The export is what a stage writes (:func:`moe_llava.training.run.export_stage`): ``config.json``
(:class:`~moe_llava.model.MoELlavaConfig`), safetensors weights, the tokenizer and the image
processor, plus ``conversion.json`` (the source config and stored dtypes, for ``--to reference``).
Every released tensor is mapped (:mod:`.keymaps`) and every weight of the model the config
describes is produced, with the shape it must have, before anything is written; the weights are
then streamed tensor by tensor (:mod:`.layout`), so memory stays near the size of the largest
tensor whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_llava.errors import CheckpointError, UserError
from moe_llava.model.convert import configmap, keymaps
from moe_llava.model.convert.layout import (
    CONFIG,
    PlannedTensor,
    TensorInfo,
    WeightFiles,
    read_json,
    write_safetensors_shards,
)
from moe_llava.model.convert.tokenizer import load_released_tokenizer

log = logging.getLogger(__name__)
CONVERSION = "conversion.json"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
DEFAULT_MAX_SHARD = "5GB"


@dataclass
class ConversionReport:
    source: str
    target: str
    backbone: str
    source_format: str
    tensors: int
    bytes_written: int
    dtypes: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise UserError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB)") from None


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"--dtype: {name!r} is not one of {sorted(DTYPES)}") from None


def _vision_source(vision_tower: Path | None, vision_config: dict | Path | None):
    """(vision config dict or None, image processor or None, tower folder or None)."""
    from transformers import AutoConfig, AutoImageProcessor

    if vision_tower is not None:
        vision_tower = Path(vision_tower)
        if not (vision_tower / CONFIG).is_file():
            raise CheckpointError("--vision-tower: not a model folder (no config.json)", file=vision_tower)
        config = AutoConfig.from_pretrained(str(vision_tower), trust_remote_code=False)
        config = getattr(config, "vision_config", config)
        processor = None
        if (vision_tower / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(str(vision_tower), trust_remote_code=False)
        return _vision_dict(config), processor, vision_tower
    if vision_config is None:
        return None, None, None
    if isinstance(vision_config, (str, Path)):
        path = Path(vision_config)
        path = path / CONFIG if path.is_dir() else path
        values = read_json(path, "vision config")
        if "vision_config" in values:  # a full CLIP / SigLIP config
            values = {**values["vision_config"], "model_type": values["model_type"] + "_vision_model"}
        vision_config = values
    return dict(vision_config), None, None


def _vision_dict(config) -> dict[str, Any]:
    values = config.to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "num_channels", "projection_dim", "model_type")  # fmt: skip
    return {k: values[k] for k in keep if k in values}


def _image_processor(vision_config: dict):
    from moe_llava.model.builder import build_image_processor

    return build_image_processor({"config": vision_config}, pretrained=False)


def expected_state(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of every weight of the model ``config`` describes (built on meta)."""
    from moe_llava.model.modeling import MoELlavaForCausalLM

    with torch.device("meta"):
        model = MoELlavaForCausalLM(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def _few(names, shown: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def plan_shape(op: keymaps.Op, infos: dict[str, TensorInfo | tuple]) -> tuple[int, ...]:
    if op.kind == "zeros":
        return op.shape
    shapes = [infos[s].shape for s in op.sources]
    if op.kind == "split":
        rows, *rest = shapes[0]
        if rows % op.parts:
            raise UserError(f"{op.sources[0]}: {rows} rows do not split into {op.parts} equal parts")
        return (rows // op.parts, *rest)
    if op.kind == "concat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


class _Producer:
    """Makes each planned tensor from its sources; keeps the latest source, which the next op
    usually shares (Qwen's q, k and v come from one c_attn tensor)."""

    def __init__(self, read):
        self.read = read
        self._last: tuple[str, torch.Tensor] | None = None

    def source(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous one first
            self._last = (name, self.read(name))
        return self._last[1]

    def make(self, op: keymaps.Op, dtype: torch.dtype, shape: tuple[int, ...]):
        def produce() -> torch.Tensor:
            if op.kind == "zeros":
                return torch.zeros(shape, dtype=dtype)
            if op.kind == "concat":
                return torch.cat([self.source(s).to(dtype) for s in op.sources])
            tensor = self.source(op.sources[0])
            if op.kind == "split":
                rows = tensor.shape[0] // op.parts
                tensor = tensor[op.index * rows : (op.index + 1) * rows]
            return tensor.to(dtype).contiguous()

        return produce


def convert_released(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    vision_config: dict | str | Path | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ConversionReport:
    """Convert the released checkpoint folder ``src`` into our export ``dst`` (written atomically).

    Args:
        dtype: cast floating weights to this dtype (routers stay fp32); default: as stored.
        vision_tower: the tower's own folder (its hub original): config, weights and image
            processor from there instead of the checkpoint's bf16-rounded copy.
        vision_config: the tower's config (dict or config.json) when ``mm_image_tower`` is not a
            known hub id; the weights still come from the checkpoint.
    """
    from moe_llava.atomic import write_dir
    from moe_llava.data.tokenizer import ensure_image_token
    from moe_llava.model.configuration import MoELlavaConfig

    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError("not a folder", file=src)
    cast = resolve_dtype(dtype)
    config_file = src / CONFIG
    source_config = read_json(config_file, "config.json")
    if not isinstance(source_config, dict):
        raise CheckpointError("not a JSON object", file=config_file)
    vision_values, processor, tower_dir = _vision_source(
        Path(vision_tower) if vision_tower else None, vision_config
    )
    backbone, fields, vision_values = configmap.released_to_ours(
        source_config, config_file, vision_config=vision_values
    )
    files = WeightFiles(src)
    ops, unmapped = keymaps.released_to_ours(backbone, list(files.infos))
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} tensor(s) have no place in the converted model: {_few(unmapped)}", file=src
        )
    infos: dict[str, Any] = dict(files.infos)
    notes = []
    tower_state = None
    if tower_dir is not None:
        from moe_llava.model.builder import VISION_TOWER_CLASSES

        cls = VISION_TOWER_CLASSES[vision_values["model_type"]]
        tower_state = cls.from_pretrained(str(tower_dir), trust_remote_code=False).state_dict()
        replaced = [op for op in ops if op.target.startswith("vision_tower.")]
        ops = [op for op in ops if not op.target.startswith("vision_tower.")]
        for name, tensor in tower_state.items():
            key = f"@tower/{name}"
            infos[key] = TensorInfo(key, tensor.dtype, tuple(tensor.shape), tower_dir)
            ops.append(keymaps.Op(f"vision_tower.{name}", (key,)))
        notes.append(
            f"vision tower from {tower_dir} ({len(tower_state)} tensors; {len(replaced)} checkpoint copies not used)"
        )

    tokenizer = load_released_tokenizer(src)
    ensure_image_token(tokenizer)
    from moe_llava.constants import IMAGE_TOKEN

    if processor is None:
        processor = _image_processor(vision_values)
    config = MoELlavaConfig(
        **fields,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_color=configmap.reference_pad_color(processor.image_mean),
    )
    expected = expected_state(config)
    if backbone == "phi" and keymaps.PHI_LM_HEAD_BIAS in expected:  # the reference's lm_head has no bias
        ops.append(
            keymaps.Op(keymaps.PHI_LM_HEAD_BIAS, (), "zeros", shape=expected[keymaps.PHI_LM_HEAD_BIAS][0])
        )

    targets = Counter(op.target for op in ops)
    twice = [t for t, n in targets.items() if n > 1]
    missing = set(expected) - set(targets)
    extra = set(targets) - set(expected)
    if twice or missing or extra:
        problems = []
        if missing:
            problems.append(
                f"no released tensor for {len(missing)} weight(s), which would stay random: {_few(missing)}"
            )
        if extra:
            sources = sorted(s for op in ops if op.target in extra for s in op.sources)
            problems.append(f"{len(extra)} tensor(s) that config.json does not describe: {_few(sources)}")
        if twice:
            problems.append(f"weights made twice: {_few(twice)}")
        raise CheckpointError("; ".join(problems), file=src)

    planned: list[PlannedTensor] = []
    stored: Counter = Counter()
    order = {name: i for i, name in enumerate(files.infos)}
    shard_rank = {shard: i for i, shard in enumerate(files.shards)}

    def source_position(op: keymaps.Op):
        if not op.sources:
            return (len(shard_rank) + 1, 0)
        info = infos[op.sources[0]]
        return (shard_rank.get(info.shard, len(shard_rank)), order.get(op.sources[0], 0))

    ops.sort(key=source_position)  # read each shard once, in its own order
    tower_read = (lambda name: tower_state[name.split("/", 1)[1]]) if tower_state is not None else None

    with files.reader() as reader:

        def read(name: str) -> torch.Tensor:
            return tower_read(name) if name.startswith("@tower/") else reader.get(name)

        producer = _Producer(read)
        for op in ops:
            shape = plan_shape(op, infos)
            want_shape, _ = expected[op.target]
            if tuple(shape) != tuple(want_shape):
                raise CheckpointError(
                    f"tensor {op.sources[0] if op.sources else op.target!r}: shape {tuple(shape)}, but "
                    f"config.json makes {op.target} {tuple(want_shape)}",
                    file=infos[op.sources[0]].shard if op.sources else src,
                )
            if op.sources:
                source_dtype = infos[op.sources[0]].dtype
            else:
                source_dtype = Counter(i.dtype for i in files.infos.values()).most_common(1)[0][0]
            if op.is_router:
                out_dtype = torch.float32
            elif cast is not None and source_dtype.is_floating_point:
                out_dtype = cast
            else:
                out_dtype = source_dtype
            stored[str(out_dtype).removeprefix("torch.")] += 1
            planned.append(
                PlannedTensor(op.target, out_dtype, tuple(shape), producer.make(op, out_dtype, shape))
            )

        main_dtype = Counter(
            p.dtype
            for p in planned
            if p.dtype.is_floating_point and not p.name.endswith(keymaps.ROUTER_SUFFIX)
        ).most_common(1)[0][0]
        config.dtype = main_dtype
        config.architectures = ["MoELlavaForCausalLM"]
        provenance = {
            "converted_by": "moe-llava model convert",
            "source": str(src),
            "source_format": files.format,
            "source_config": source_config,
            "source_dtypes": {
                name: str(info.dtype).removeprefix("torch.") for name, info in files.infos.items()
            },
            "source_tokenizer_class": _tokenizer_class(src),
            "vision_tower": str(tower_dir) if tower_dir else None,
        }
        written: dict[str, int] = {}

        def save(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            weight_map = write_safetensors_shards(folder, planned, parse_size(max_shard_size))
            written["bytes"] = sum(p.nbytes for p in planned)
            written["files"] = len(set(weight_map.values()))
            config.save_pretrained(folder)
            tokenizer.save_pretrained(str(folder))
            processor.save_pretrained(str(folder))
            (folder / CONVERSION).write_text(json.dumps(provenance, indent=2) + "\n")

        write_dir(dst, save, "converted export")
    return ConversionReport(
        source=str(src),
        target=str(dst),
        backbone=backbone,
        source_format=files.format,
        tensors=len(planned),
        bytes_written=written["bytes"],
        dtypes=dict(stored),
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _tokenizer_class(folder: Path) -> str | None:
    from moe_llava.model.convert.tokenizer import tokenizer_class_of

    return tokenizer_class_of(folder)
