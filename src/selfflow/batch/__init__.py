"""The FID batch: sample N images from a checkpoint into a folder, resumably, on any GPU count.

From Python::

    from selfflow.batch import BatchConfig, generate_fid_batch

    result = generate_fid_batch(BatchConfig(checkpoint="model.pt", num_samples=50_000))

``selfflow sample`` is the same call from the command line (:mod:`selfflow.batch.cli`).
The names are loaded on first use, so that ``selfflow --help`` does not import torch.
"""

from __future__ import annotations

from selfflow.base.lazy import lazy_names

__all__ = ["BatchConfig", "BatchResult", "generate_fid_batch"]
_HOMES = {
    "BatchConfig": "selfflow.batch.config",
    "BatchResult": "selfflow.batch.config",
    "generate_fid_batch": "selfflow.batch.runner",
}


__getattr__ = lazy_names(__name__, _HOMES)
