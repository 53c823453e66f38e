"""Load a stage export's model: this architecture only, safetensors weights only, every weight present.

``from_pretrained`` alone would unpickle a ``pytorch_model.bin``, build a MoE-LLaVA from another
architecture's ``config.json`` (with random weights), and leave missing weights randomly initialised
with a warning. Each of these is a :class:`~moe_llava.errors.CheckpointError` here, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_llava.constants import MODEL_TYPE
from moe_llava.errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder (a LoRA stage with lora.export=adapter)
ADAPTERS_ONLY = (
    "holds LoRA adapters only (lora.export=adapter), not a model export: "
    "merge them into their base first (moe-llava model merge-lora BASE ADAPTER DST)"
)


def check_export_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of ``model_dir`` as a dict, if it is a MoE-LLaVA config (reads JSON only)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        if (Path(model_dir) / ADAPTER_CONFIG).is_file():
            raise CheckpointError(ADAPTERS_ONLY, file=model_dir)
        raise CheckpointError("not a model export (no config.json)", file=model_dir)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"not valid JSON ({err})", file=config_file) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    from moe_llava.model.convert.configmap import MODEL_TYPES, convert_hint

    if model_type in MODEL_TYPES:
        raise CheckpointError(convert_hint(model_dir, model_type), file=config_file)
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"model_type {model_type!r} is not a MoE-LLaVA model ({MODEL_TYPE!r})",
            file=config_file,
        )
    return config


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors weight files of ``model_dir`` (one file, or the shards of an index)."""
    model_dir = Path(model_dir)
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [model_dir / SAFE_WEIGHTS]
    index = model_dir / SAFE_WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"not a safetensors index ({err!r})", file=index) from None
        if not all(isinstance(s, str) and s.endswith(".safetensors") and Path(s).name == s for s in shards):
            raise CheckpointError("shards must be .safetensors files beside the index", file=index)
        return [model_dir / shard for shard in shards]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"; found {pickles}, which are never loaded (unpickling can run code)" if pickles else ""
    raise CheckpointError(f"no {SAFE_WEIGHTS}: only safetensors weights are loaded{found}", file=model_dir)


def check_export(model_dir: str | Path) -> dict[str, Any]:
    """Everything :func:`load_export_model` checks before reading weights: config.json, the
    safetensors files and their headers (no tensor is read). Returns the config as a dict."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    config = check_export_config(model_dir)
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt"):  # reads the header only
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"not a readable safetensors file ({err}): corrupt, truncated, or another format "
                "(e.g. a pickle) under this name",
                file=file,
            ) from None
    return config


def load_export_model(model_dir: str | Path, **kwargs: Any):
    """``MoELlavaForCausalLM.from_pretrained(model_dir, **kwargs)`` after the checks above.

    Weights load in float32 unless ``dtype`` says otherwise (whatever the export was written in:
    a bfloat16 export trains on with float32 weights under mixed precision).
    """
    import torch

    from moe_llava.model.modeling import MoELlavaForCausalLM

    model_dir = Path(model_dir)
    check_export(model_dir)
    kwargs.setdefault("dtype", torch.float32)
    model, info = MoELlavaForCausalLM.from_pretrained(
        model_dir,
        use_safetensors=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below with the shapes, not as a bare RuntimeError
        **kwargs,
    )
    problems = [
        f"{kind.replace('_', ' ')} {_names(info[kind])}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(kind)
    ]
    if problems:
        raise CheckpointError(
            f"weights do not match config.json ({'; '.join(problems)}): not a complete export of this model",
            file=model_dir,
        )
    return model


def _names(keys: Any, shown: int = 3) -> str:
    keys = [k if isinstance(k, str) else k[0] for k in keys]  # mismatched: (key, ckpt shape, model shape)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{sorted(keys)[:shown]}{more}"


def save_weights(model, folder: str | Path, *, dtype=None, max_shard_size: int | str = "5GB") -> None:
    """``model.save_pretrained(folder)`` with the weights as ``dtype`` on disk (None: as they are).

    The live model is not touched: its state dict is cast tensor by tensor (tied weights stay one
    tensor), the modules ``_keep_in_fp32_modules`` names (the routers) stay float32, and
    ``config.json`` records the dtype written. Above ``max_shard_size`` the weights are
    safetensors shards with an index (:func:`weight_files` reads both).
    """
    import torch

    folder = Path(folder)
    state_dict = None
    if dtype is not None and dtype != model.dtype:
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        cast: dict[tuple, torch.Tensor] = {}
        state_dict = {}
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or any(f".{m}." in f".{name}" for m in keep):
                state_dict[name] = tensor
                continue
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if key not in cast:
                cast[key] = tensor.detach().to(dtype)
            state_dict[name] = cast[key]
    model.save_pretrained(folder, state_dict=state_dict, max_shard_size=max_shard_size)
    if state_dict is not None:  # save_pretrained records the live model's dtype
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        for sub in ("text_config", "vision_config"):
            if isinstance(config.get(sub), dict) and "dtype" in config[sub]:
                config[sub]["dtype"] = name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
