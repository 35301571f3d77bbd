"""The batch on disk: a fixed plan of shards, shard files written atomically, and their checks.

**The plan.** Samples ``0 … N−1`` are cut into consecutive index ranges of ``shard_size``
samples (the last one may be shorter). The shard size is chosen once per output folder from
``N`` alone (never from the number of processes or the batch size) and stored in the manifest,
so a run resumed with another GPU count or batch size sees the same shards: a finished shard is
valid whoever made it, because sample ``i`` is a function of ``(seed, i)`` only.

**A shard file** ``shards/shard_00042.npz`` holds ``images`` (uint8, ``(n, H, W, 3)``),
``labels`` (int64) and ``indices`` (int64). It is written under a hidden temporary name,
flushed to disk and renamed, so a file with the final name is always complete; a file that is
truncated or damaged anyway (a full disk, a copy gone wrong) fails :func:`read_shard`'s checks —
the zip CRC of every array included — and is redone.

numpy only: no torch here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.base.files import atomic_write
from selfflow.base.npz import ARCHIVE_ERRORS

SHARD_DIR = "shards"
IMAGE_DIR = "images"
MAX_SHARD_SIZE = 125
MIN_SHARDS = 64


def default_shard_size(num_samples: int) -> int:
    """``min(125, ceil(N / 64))``: a function of ``N`` alone.

    At most 125 images (25 MB at 256 × 256) per shard bounds what a process holds; at least 64
    shards (when ``N`` allows) keeps up to 64 processes evenly busy. For ``N = 50 000``: 400
    shards of 125, which split exactly over 1, 2, 4, 8 or 16 processes.
    """
    return max(1, min(MAX_SHARD_SIZE, math.ceil(num_samples / MIN_SHARDS)))


@dataclass(frozen=True)
class Shard:
    """Samples ``start … stop−1``, stored in one file."""

    id: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)

    @property
    def filename(self) -> str:
        return f"shard_{self.id:05d}.npz"


@dataclass(frozen=True)
class ShardPlan:
    num_samples: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.num_samples <= 0 or self.shard_size <= 0:
            raise ValueError(f"bad plan: {self.num_samples} samples in shards of {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    def shard(self, shard_id: int) -> Shard:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard {shard_id} is not in a plan of {self.num_shards} shards")
        start = shard_id * self.shard_size
        return Shard(shard_id, start, min(start + self.shard_size, self.num_samples))

    @property
    def shards(self) -> list[Shard]:
        return [self.shard(k) for k in range(self.num_shards)]


def shard_path(output_dir: Path, shard: Shard) -> Path:
    return Path(output_dir) / SHARD_DIR / shard.filename


def png_path(output_dir: Path, index: int, num_samples: int) -> Path:
    """``images/000123.png``: six digits (more when ``N`` needs them), the sample's global index."""
    width = max(6, len(str(num_samples - 1)))
    return Path(output_dir) / IMAGE_DIR / f"{index:0{width}d}.png"


def write_shard(output_dir: Path, shard: Shard, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write a finished shard atomically (temporary name, fsync, rename)."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != shard.size:
        raise ValueError(
            f"shard {shard.id} needs uint8 images (n={shard.size}, H, W, 3); got "
            f"{images.dtype} {images.shape}"
        )
    if labels.shape != (shard.size,):
        raise ValueError(f"shard {shard.id} needs {shard.size} labels; got {labels.shape}")
    return atomic_write(
        shard_path(output_dir, shard),
        lambda handle: np.savez(handle, images=images, labels=labels, indices=shard.indices),
    )


class ShardError(Exception):
    """A shard file is missing, unreadable or holds something else than the plan says."""


def read_shard(
    path: Path,
    shard: Shard,
    image_shape: tuple[int, int, int] | None = None,
    expected_labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a shard file after checking everything that can be checked.

    Reading each array to its end makes zipfile compare its CRC-32, so flipped bytes are caught
    as well as truncation; shapes, dtypes, the index range and (when given) the labels the plan
    expects must all match.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"images", "labels", "indices"} - set(archive.files)
            if missing:
                raise ShardError(f"missing arrays {sorted(missing)}")
            images = archive["images"]
            labels = archive["labels"]
            indices = archive["indices"]
    except ShardError:
        raise
    except FileNotFoundError as error:
        raise ShardError("the file does not exist") from error
    except (*ARCHIVE_ERRORS, KeyError) as error:
        raise ShardError(f"unreadable ({type(error).__name__}: {error})") from error
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != shard.size:
        raise ShardError(
            f"images are {images.dtype} {images.shape}, expected uint8 ({shard.size}, H, W, 3)"
        )
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ShardError(f"images are {images.shape[1:]}, expected {tuple(image_shape)}")
    if indices.shape != (shard.size,) or not np.array_equal(indices, shard.indices):
        raise ShardError(f"it holds other samples than {shard.start}…{shard.stop - 1}")
    if labels.shape != (shard.size,) or labels.dtype.kind not in "iu":
        raise ShardError(
            f"labels are {labels.dtype} {labels.shape}, expected {shard.size} integers"
        )
    if expected_labels is not None and not np.array_equal(labels, expected_labels):
        raise ShardError("its labels differ from the plan's (it was made with other settings)")
    return images, labels.astype(np.int64, copy=False)


def existing_shards(output_dir: Path, plan: ShardPlan) -> list[Shard]:
    """Shards of the plan whose final file exists (not yet verified)."""
    folder = Path(output_dir) / SHARD_DIR
    if not folder.is_dir():
        return []
    names = {entry.name for entry in os.scandir(folder)}
    return [shard for shard in plan.shards if shard.filename in names]
