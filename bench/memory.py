"""Peak tensor memory of one call, on CPU and GPU.

On CUDA this is ``torch.cuda.max_memory_allocated`` above the level before the call.

On CPU torch keeps no allocator statistics (and ``tracemalloc`` does not see torch's
allocations), so :class:`TensorMemoryTracker` counts it itself: a ``TorchDispatchMode`` sees
every ATen op, including those autograd runs in backward, and registers the storage of each
output tensor it has not seen before; a finalizer subtracts the bytes when the storage is
freed. Storages that existed before the call (inputs, parameters) and views of them are not
counted. The result is the peak of *tensor bytes alive at once that the call created*:
activations saved for backward, temporaries, gradients. It does not count allocator slack,
Python objects or library workspaces (MKL/oneDNN scratch), so it is a lower bound of the RSS
growth and the right number for comparing layer implementations with each other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.external: set[int] = set()
        self.current = 0
        self.peak = 0

    def _freed(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def _forget_external(self, ptr: int) -> None:
        self.external.discard(ptr)

    @staticmethod
    def _storages(tree):
        for value in tree_flatten(tree)[0]:
            if (
                isinstance(value, torch.Tensor)
                and value.device.type == "cpu"
                and value.layout == torch.strided
            ):
                storage = value.untyped_storage()
                ptr = storage.data_ptr()
                if ptr:
                    yield ptr, storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for ptr, storage in self._storages((args, kwargs)):
            if ptr not in self.live and ptr not in self.external:
                self.external.add(ptr)
                weakref.finalize(storage, self._forget_external, ptr)
        out = func(*args, **kwargs)
        for ptr, storage in self._storages(out):
            if ptr in self.live or ptr in self.external:
                continue
            nbytes = storage.nbytes()
            self.live[ptr] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, ptr)
        return out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with TensorMemoryTracker() as tracker:
        fn()
    return int(tracker.peak)
