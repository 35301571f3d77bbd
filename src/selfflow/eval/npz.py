"""The evaluator's view of its ``.npz`` inputs: image batches checked on open, statistics.

Images are streamed with :class:`selfflow.base.npz.NpzArray` (a 50 000-image batch at 256 x 256 is
9.8 GB; memory stays at one batch); here they are checked for the layout ADM's evaluator and
``sample.py`` use, with messages that name the file's role. Small arrays (statistics) go through
``np.load`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from selfflow.base.errors import ConfigurationError
from selfflow.base.npz import NpzArray, npz_keys, verify_npz

MIN_IMAGES = 4  # precision/recall need a 3rd neighbour besides the point itself


class NpzImages(NpzArray):
    """An image array inside an npz, checked on open and read in batches.

    The array must be uint8 of shape (N, H, W, 3) with N >= ``min_images``: the layout ADM's
    evaluator and ``sample.py`` use.
    """

    row_name = "images"

    def __init__(
        self,
        path: str | os.PathLike,
        key: str = "arr_0",
        role: str = "sample batch",
        min_images: int = MIN_IMAGES,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"{role} {path} does not exist")
        keys = npz_keys(path)
        if key not in keys:
            raise ConfigurationError(
                f"{role} {path} has no array {key!r} (expected uint8 images of shape "
                f"(N, H, W, 3) under {key!r}; found {', '.join(map(repr, keys)) or 'no arrays'})"
            )
        super().__init__(path, key, label=f"{role} {path}")
        where, shape, dtype = self.where, self.shape, self.dtype
        if dtype != np.uint8:
            raise ConfigurationError(
                f"{where} holds {dtype} images; expected uint8 values 0..255 "
                f"(convert with np.clip(np.round(x), 0, 255).astype(np.uint8) if x is in 0..255)"
            )
        if len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
            raise ConfigurationError(
                f"{where} has shape {list(shape)}; expected (N, H, W, 3) RGB images in NHWC order"
            )
        if self.info.fortran_order:
            raise ConfigurationError(f"{where} is stored in Fortran order; expected C order")
        if shape[0] < min_images:
            raise ConfigurationError(
                f"{where} holds {shape[0]} images; at least {min_images} are needed "
                f"(precision/recall use each image's 3rd nearest neighbour)"
            )

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 batches in file order; only one batch is held at a time."""
        if batch_size < 1:
            raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")
        yield from self.rows(batch_size)


def read_small_arrays(path: Path, keys: list[str], role: str) -> dict[str, np.ndarray]:
    """Load the named (small) arrays of an npz safely; absent keys are left out."""
    present = set(npz_keys(path))
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in keys:
                if key in present:
                    out[key] = np.asarray(archive[key])
    except MemoryError:
        raise
    except Exception as error:  # whatever np.load / zipfile raise on damaged bytes
        raise ConfigurationError(
            f"{role} {path}: cannot read {keys}, the file is damaged ({type(error).__name__}: "
            f"{error})"
        ) from error
    return out


def verify_batch(path: Path, role: str, progress: bool = True) -> None:
    """Read an npz end to end before any network work: the CRC-32 of every array and each
    array's length against its header. A sample file damaged in the middle is then reported
    in seconds, not after the reference pass (minutes on a CPU)."""
    from tqdm.auto import tqdm

    with tqdm(
        total=Path(path).stat().st_size,
        desc=f"checking {role}",
        unit="B",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        verify_npz(path, label=f"{role} {path}", on_bytes=bar.update)
