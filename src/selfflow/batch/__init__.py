"""The FID batch: sample N images from a checkpoint into a folder, resumably, on any GPU count.

From Python::

    from selfflow.batch import BatchConfig, generate_fid_batch

    result = generate_fid_batch(BatchConfig(checkpoint="model.pt", num_samples=50_000))

``selfflow sample`` is the same call from the command line (:mod:`selfflow.batch.cli`).
The names are loaded on first use, so that ``selfflow --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BatchConfig", "BatchResult", "generate_fid_batch"]
_HOMES = {
    "BatchConfig": "selfflow.batch.config",
    "BatchResult": "selfflow.batch.config",
    "generate_fid_batch": "selfflow.batch.runner",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'selfflow.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
