"""Lazy re-exports for the packages' ``__init__`` (PEP 562): a name is imported from its module on first use.

Every package of ``moe_llava`` has the same ``__init__``: a docstring naming its modules, the map of
its public names to the modules that define them, ``__all__``, and ``__getattr__`` from
:func:`lazy_exports`. So ``from moe_llava.training import run_stage`` works, and importing a light
module of a package (the registry CLI, the data checks) does not import the heavy ones.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to its module."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
