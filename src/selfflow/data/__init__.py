"""Training data: ImageNet-style folders → ADM's crop → SD-VAE posterior → memory-mapped shards.

``write_dataset`` and ``LatentDataset`` are the storage format; ``adm_center_crop`` is the crop
every image goes through; ``selfflow prepare`` (:mod:`selfflow.data.prepare`) runs the whole
extraction on any number of processes.
"""

from __future__ import annotations

from selfflow.data.crop import adm_center_crop
from selfflow.data.dataset import LatentDataset
from selfflow.data.store import write_dataset

__all__ = ["LatentDataset", "adm_center_crop", "write_dataset"]
