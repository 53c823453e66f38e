"""Device selection and a description of the machine the numbers came from."""

from __future__ import annotations

import os
import platform

import torch


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; otherwise exactly ``requested``."""
    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} was requested but torch sees no CUDA device")
    return device


def default_dtypes(device: torch.device) -> tuple[str, ...]:
    """fp32 and bf16 everywhere bf16 runs at speed; on a GPU without bf16 only fp32."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ("float32",)
    return ("float32", "bfloat16")


def synchronizer(device: torch.device):
    """A callable that waits for the device's queued work (None on CPU, where work is synchronous)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    """Versions, device name and the settings that decide speed (threads, capability, ISA)."""
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a project dependency
        info["transformers"] = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["cuda"] = torch.version.cuda
    return info
