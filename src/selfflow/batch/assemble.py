"""Assemble finished shards into ``samples_{N}.npz``, one shard in memory at a time.

The result is what the official sampler and ADM's evaluator expect: ``arr_0``, uint8
``(N, H, W, 3)`` in sample-index order, plus the class labels as ``arr_1`` (int64, the name
``np.savez(path, images, labels)`` would give them, as guided-diffusion's samplers write).
Both entries are streamed (see :mod:`selfflow.base.npz`), so peak memory is one shard
whatever ``N`` is; the file appears under its final name only once it is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from selfflow.base.files import replaced_atomically
from selfflow.base.npz import NpzStreamWriter
from selfflow.batch.store import ShardError, ShardPlan, read_shard, shard_path

GRID_SAMPLES = 64


def npz_name(num_samples: int) -> str:
    return f"samples_{num_samples}.npz"


def assemble(
    output_dir: Path,
    plan: ShardPlan,
    image_shape: tuple[int, int, int],
    *,
    expected_labels: Callable[[np.ndarray], np.ndarray] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> tuple[Path, np.ndarray]:
    """Write ``samples_{N}.npz`` from the plan's shards; returns its path and the first 64 images.

    ``expected_labels(indices)`` (optional) re-checks each shard's labels against the plan;
    ``on_shard(n)`` is called after each shard with its number of images (for a progress bar).
    A missing or damaged shard raises :class:`ShardError` and leaves no npz behind.
    """
    output_dir = Path(output_dir)
    final = output_dir / npz_name(plan.num_samples)
    first: list[np.ndarray] = []
    kept = 0
    with replaced_atomically(final) as tmp, NpzStreamWriter(tmp) as npz:
        with npz.array("arr_0", (plan.num_samples, *image_shape), np.uint8) as out:
            for shard in plan.shards:
                path = shard_path(output_dir, shard)
                expected = expected_labels(shard.indices) if expected_labels else None
                try:
                    images, _ = read_shard(path, shard, image_shape, expected)
                except ShardError as error:
                    raise ShardError(f"{path}: {error}") from error
                out.write(images)
                if kept < GRID_SAMPLES:
                    take = images[: GRID_SAMPLES - kept].copy()
                    first.append(take)
                    kept += len(take)
                del images
                if on_shard is not None:
                    on_shard(shard.size)
        # Labels in a second pass: reading only the small ``labels`` member of each shard
        # keeps memory flat instead of holding N labels.
        with npz.array("arr_1", (plan.num_samples,), np.int64) as out:
            for shard in plan.shards:
                with np.load(shard_path(output_dir, shard), allow_pickle=False) as archive:
                    out.write(archive["labels"].astype(np.int64, copy=False))
    grid = np.concatenate(first) if first else np.zeros((0, *image_shape), np.uint8)
    return final, grid
