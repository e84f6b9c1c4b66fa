"""Lazy package namespaces (PEP 562): a package names the module that defines each public
name, and that module is imported on first access. So `import stabilitylab.store` (the
dashboard's door into the lab) or `stabilitylab.analysis.scaling` never loads torch.

    __getattr__, __dir__, __all__ = lazy_namespace(__name__, {"LoopedLM": "stabilitylab.model"})
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_namespace(package: str, exports: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """The module-level `__getattr__`, `__dir__` and `__all__` of `package`, whose public names
    map to the modules that define them in `exports`."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *exports])

    return __getattr__, __dir__, sorted(exports)
