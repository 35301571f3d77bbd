"""Batched Inception features of an npz image array.

Images are read one batch at a time (a background thread reads the next batch while the
network runs on the current one); only the features are kept: 2048 + 2023 float32 values per
image, about 16 kB, against 196 kB for a 256 x 256 image.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from selfflow.base.errors import EvaluationError
from selfflow.base.precision import full_fp32
from selfflow.eval.inception import InceptionV3
from selfflow.eval.npz import NpzImages

# Bump whenever a change (graph executor, resize, feature layout, dtype) can change a feature
# value: reference features cached under another revision are then computed again.
FEATURES_REVISION = 1

BATCH_SIZE = 64  # ADM's batch size
SOFTMAX_BATCH = 512  # ADM's softmax batch size


@dataclass
class Activations:
    """pool_3 features (N, 2048) and spatial features (N, 2023), float32, in file order."""

    pool: np.ndarray
    spatial: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


def compute_activations(
    model: InceptionV3,
    images: NpzImages,
    batch_size: int = BATCH_SIZE,
    desc: str = "features",
    progress: bool = True,
) -> Activations:
    """Run every image of ``images`` through the network, ``batch_size`` at a time."""
    total = len(images)
    pool = spatial = None
    done = 0
    bar = tqdm(
        total=total,
        desc=desc,
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    batches = images.batches(batch_size)
    try:
        with full_fp32(), ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(next, batches, None)
            while (batch := pending.result()) is not None:
                pending = reader.submit(next, batches, None)
                pool_b, spatial_b = model.features(torch.from_numpy(batch))
                if pool is None:
                    pool = np.empty((total, pool_b.shape[1]), dtype=np.float32)
                    spatial = np.empty((total, spatial_b.shape[1]), dtype=np.float32)
                n = len(batch)
                pool[done : done + n] = pool_b.cpu().numpy()
                spatial[done : done + n] = spatial_b.cpu().numpy()
                done += n
                bar.update(n)
    finally:
        batches.close()  # the reader thread is idle here: closes the zip member now
        bar.close()
    assert pool is not None and spatial is not None and done == total
    if not (np.isfinite(pool).all() and np.isfinite(spatial).all()):
        raise EvaluationError(
            f"the Inception graph produced non-finite features for {images.path}: "
            f"is the graph file corrupt?"
        )
    return Activations(pool, spatial)


def compute_softmax(
    model: InceptionV3, pool: np.ndarray, batch_size: int = SOFTMAX_BATCH
) -> np.ndarray:
    """Class probabilities for the IS, in batches as ADM computes them (float32)."""
    out = []
    with full_fp32():
        for start in range(0, len(pool), batch_size):
            chunk = torch.from_numpy(pool[start : start + batch_size])
            out.append(model.softmax(chunk).cpu().numpy())
    return np.concatenate(out, axis=0)
