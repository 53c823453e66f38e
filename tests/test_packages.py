"""Every package's lazy exports resolve to what they name, and light modules stay light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import moe_llava

PACKAGES = sorted(
    name
    for _, name, is_package in pkgutil.walk_packages(moe_llava.__path__, prefix="moe_llava.")
    if is_package
)


def test_every_package_uses_the_lazy_export_style():
    assert "moe_llava.model.moe" in PACKAGES and "moe_llava.training" in PACKAGES
    for name in PACKAGES:
        package = importlib.import_module(name)
        assert package.__doc__, f"{name}: no docstring naming its modules"
        assert hasattr(package, "_EXPORTS"), f"{name}: no _EXPORTS table"
        assert package.__all__ == sorted(package._EXPORTS), f"{name}: __all__ != sorted(_EXPORTS)"


@pytest.mark.parametrize("name", PACKAGES)
def test_each_export_is_the_object_its_module_defines(name):
    package = importlib.import_module(name)
    for export, module_name in package._EXPORTS.items():
        module = importlib.import_module(module_name)
        assert getattr(package, export) is getattr(module, export), (
            f"{name}.{export} != {module_name}.{export}"
        )
        assert export in dir(package)
    with pytest.raises(AttributeError, match=f"{name!r} has no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018


@pytest.mark.parametrize(
    "module", ["moe_llava.registry.cli", "moe_llava.data.manifest", "moe_llava.tracking", "moe_llava.errors"]
)
def test_light_modules_do_not_import_torch(module):
    # The registry CLI, the data checks and tracking run where torch may be slow to import or absent.
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"
