"""Names a package's face offers without importing them until they are used.

``import selfflow`` and ``selfflow --help`` must not import torch, diffusers or the evaluator,
yet ``from selfflow.batch import generate_fid_batch`` should just work. A face lists where each
of its names lives and takes its module ``__getattr__`` from :func:`lazy_names` (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``homes[name]`` on
    first use (the import system caches the module, so later uses cost a dict lookup)."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
