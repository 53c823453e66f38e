"""Weight files in and out, one tensor at a time: the released layout's shards read, ours written.

Reading. A released checkpoint is ``config.json`` plus sharded safetensors (``model.safetensors.index.json``)
or ``pytorch_model-*.bin`` shards (``pytorch_model.bin.index.json``), or one unsharded file. Every
shard is checked before any tensor is converted: its header (``safetensors.safe_open``), its size
against the header, the keys the index gives it. Tensors are then read one by one with positional
reads (never the whole shard, and not through a memory map, whose touched pages would count as
this process's memory until the shard is closed). ``.bin`` shards go through
``torch.load(weights_only=True)`` only, which refuses any pickled object other than tensors and
their containers, and runs no code; they are memory-mapped, and the pages of each tensor are handed
back to the kernel once it is written.

Writing. :func:`write_safetensors_shards` writes the safetensors format itself (an 8-byte header
length, a JSON header, the raw bytes): the header is computed from the planned names, dtypes and
shapes, then each tensor is produced and written in turn, so memory holds one tensor at a time,
not a shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_llava.errors import CheckpointError, UserError

CONFIG = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor is and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise CheckpointError(f"no {what}", file=file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} is not valid JSON ({err})", file=file) from None


# ---------------------------------------------------------------------------------------- reading
class WeightFiles:
    """The weight shards of a checkpoint folder: which key is in which file, each file checked.

    Args:
        folder: the checkpoint folder.
        allow_bin: accept ``pytorch_model*.bin`` shards (read with ``weights_only=True``).
    """

    def __init__(self, folder: str | Path, *, allow_bin: bool = True):
        self.folder = Path(folder)
        self.format, self.index_file, self.weight_map = self._find(allow_bin)
        self.shards = sorted({self.folder / name for name in self.weight_map.values()})
        self.infos: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for info in self._shard_infos(shard):
                self.infos[info.name] = info
        self._check_index()

    def _find(self, allow_bin: bool) -> tuple[str, Path | None, dict[str, str]]:
        for fmt, index_name, single in (
            ("safetensors", SAFE_INDEX, SAFE_SINGLE),
            ("bin", BIN_INDEX, BIN_SINGLE),
        ):
            if fmt == "bin" and not allow_bin:
                continue
            index = self.folder / index_name
            if index.is_file():
                data = read_json(index, "weight index")
                weight_map = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError("field 'weight_map': missing or empty", file=index)
                suffix = ".safetensors" if fmt == "safetensors" else ".bin"
                for key, shard in weight_map.items():
                    if not (isinstance(shard, str) and Path(shard).name == shard and shard.endswith(suffix)):
                        raise CheckpointError(
                            f"field 'weight_map.{key}': {shard!r} is not a {suffix} file beside the index",
                            file=index,
                        )
                    if not (self.folder / shard).is_file():
                        raise CheckpointError(
                            f"field 'weight_map.{key}': names {shard}, which does not exist", file=index
                        )
                return fmt, index, weight_map
            if (self.folder / single).is_file():
                return fmt, None, {}
        raise CheckpointError(
            f"no weights: expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}", file=self.folder
        )

    def _shard_infos(self, shard: Path) -> list[TensorInfo]:
        if self.format == "safetensors":
            return [info for info, _ in safetensors_header(shard)]
        with _bin_state_dict(shard) as state:
            return [TensorInfo(k, v.dtype, tuple(v.shape), shard) for k, v in state.items()]

    def _check_index(self) -> None:
        if self.index_file is None:  # one unsharded file: it is its own index
            single = self.folder / (SAFE_SINGLE if self.format == "safetensors" else BIN_SINGLE)
            self.shards = [single]
            self.infos = {info.name: info for info in self._shard_infos(single)}
            self.weight_map = {name: single.name for name in self.infos}
            return
        for key, shard in self.weight_map.items():
            info = self.infos.get(key)
            if info is None or info.shard.name != shard:
                raise CheckpointError(
                    f"field 'weight_map.{key}': the index puts it in {shard}, which does not hold it",
                    file=self.index_file,
                )
        unindexed = sorted(set(self.infos) - set(self.weight_map))
        if unindexed:
            raise CheckpointError(
                f"field 'weight_map': misses {_few(unindexed)}, stored in "
                f"{self.infos[unindexed[0]].shard.name}",
                file=self.index_file,
            )

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    def reader(self) -> TensorReader:
        return TensorReader(self)


def safetensors_header(file: Path) -> list[tuple[TensorInfo, tuple[int, int]]]:
    """(info, absolute byte range) of every tensor of a safetensors file; checks the file is whole."""
    from safetensors import SafetensorError, safe_open

    try:  # the library's own validation of the header and of the offsets
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(_why_unreadable(file, err), file=file) from None
    size = file.stat().st_size
    with file.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    entries = []
    end = base
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r}: unsupported dtype {meta['dtype']}", file=file)
        start, stop = meta["data_offsets"]
        end = max(end, base + stop)
        entries.append((TensorInfo(name, dtype, tuple(meta["shape"]), file), (base + start, base + stop)))
    if {info.name for info, _ in entries} != names or end != size:
        raise CheckpointError(f"truncated: the header describes {end} bytes, the file has {size}", file=file)
    return entries


def _why_unreadable(file: Path, err: Exception) -> str:
    """What is wrong with a safetensors file that the library refused: the first tensor past the
    end of a truncated file, when the header can still be read."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len)) if 8 + header_len <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if isinstance(header, dict):
        base = 8 + header_len
        ends = sorted(
            (base + meta["data_offsets"][1], name)
            for name, meta in header.items()
            if name != "__metadata__" and isinstance(meta, dict) and "data_offsets" in meta
        )
        cut = next(((end, name) for end, name in ends if end > size), None)
        if cut is not None:
            return f"truncated: tensor {cut[1]!r} ends at byte {cut[0]}, the file has {size} bytes"
    return f"not a readable safetensors file ({err}): truncated, corrupt, or another format under this name"


@contextlib.contextmanager
def _bin_state_dict(file: Path) -> Iterator[dict[str, torch.Tensor]]:
    """A ``.bin`` shard's tensors, memory-mapped, through ``torch.load(weights_only=True)`` only."""
    import pickle

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # a legacy (non-zip) torch.save file cannot be mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[-1])
        raise CheckpointError(
            f"refused: the pickle holds objects other than tensors ({detail.strip()}); it was not loaded "
            "and none of its code ran",
            file=file,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"not a readable torch .bin file ({err}): truncated or corrupt", file=file
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError("not a state dict (a mapping of names to tensors)", file=file)
    try:
        yield state
    finally:
        del state


class TensorReader:
    """Reads stored tensors by name, one at a time, into memory the caller owns."""

    def __init__(self, files: WeightFiles):
        self.files = files
        self._open: tuple[Path, Any] | None = None  # the .bin shard mapped now
        self._ranges: dict[str, tuple[int, int]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._open = None
        self._stack.close()

    def get(self, name: str) -> torch.Tensor:
        info = self.files.infos[name]
        if self.files.format == "safetensors":
            return self._read_safetensors(info)
        return self._read_bin(info)

    def _read_safetensors(self, info: TensorInfo) -> torch.Tensor:
        if name_range := self._ranges.get(info.name):
            start, stop = name_range
        else:
            self._ranges.update({i.name: r for i, r in safetensors_header(info.shard)})
            start, stop = self._ranges[info.name]
        out = torch.empty(stop - start, dtype=torch.uint8)
        if out.numel():
            view = memoryview(out.numpy())
            with info.shard.open("rb", buffering=0) as fh:
                done = 0
                while done < len(view):
                    n = os.preadv(fh.fileno(), [view[done:]], start + done)
                    if n <= 0:
                        raise CheckpointError(
                            f"tensor {info.name!r}: file ends early (truncated)", file=info.shard
                        )
                    done += n
        return out.view(info.dtype).reshape(info.shape)

    def _read_bin(self, info: TensorInfo) -> torch.Tensor:
        if self._open is None or self._open[0] != info.shard:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            self._open = (info.shard, self._stack.enter_context(_bin_state_dict(info.shard)))
        mapped = self._open[1][info.name]
        out = mapped.clone(memory_format=torch.contiguous_format)
        _release_pages(mapped)
        return out


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped (private, unmodified) tensor: they are re-read from
    the file if touched again, and stop counting as this process's memory. Best effort (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, (stop // page) * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


# ---------------------------------------------------------------------------------------- writing
@dataclass
class PlannedTensor:
    """One tensor of the output: its name, dtype and shape, and how to produce it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def shard_plan(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_safetensors_shards(
    folder: Path,
    tensors: list[PlannedTensor],
    max_shard_bytes: int,
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write ``tensors`` as ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``; returns the weight map."""
    shards = shard_plan(tensors, max_shard_bytes)
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, shards):
        _write_one(folder / file_name, group, on_tensor)
        weight_map.update({t.name: file_name for t in group})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def _write_one(file: Path, group: list[PlannedTensor], on_tensor) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in group:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    with file.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for tensor in group:
            value = tensor.produce()
            if value.dtype != tensor.dtype or tuple(value.shape) != tensor.shape:
                raise UserError(
                    f"{tensor.name}: produced {value.dtype} {tuple(value.shape)}, planned "
                    f"{tensor.dtype} {tensor.shape}"
                )
            data = value.contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                fh.write(memoryview(data.numpy()))
            del value, data
            if on_tensor is not None:
                on_tensor(tensor.name)


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"
