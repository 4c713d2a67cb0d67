"""The numba kernel modules of the rules (``tall_kernels``, ``ties_kernels``,
``magnitude_kernels``, ``dare_kernels``, ``finite_kernels``, ``task_arithmetic_kernels``,
``trust_region_kernels``), imported on first use: numba and loading (or, the first time,
compiling) a module's kernels cost about 125 MB and half a second, which only the rules
that call them should pay, not every ``import mergelab``."""

from __future__ import annotations

import importlib
from types import ModuleType


def kernels(module: str) -> ModuleType:
    """``mergelab.merging.<module>``, imported now if it was not."""
    return importlib.import_module(f"{__package__}.{module}")
