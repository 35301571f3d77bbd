"""Streaming reads of image batches from ``.npz`` files.

A 50 000-image batch at 256 x 256 is 9.8 GB; ``np.load(...)["arr_0"]`` would hold it all. We
open the ``arr_0.npy`` member inside the zip, parse its ``.npy`` header for dtype and shape, and
then read ``batch_size`` images at a time (stored and deflated members alike), so memory does
not grow with the number of samples. Small arrays (statistics) go through ``np.load`` with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from selfflow.errors import ConfigurationError

MIN_IMAGES = 4  # precision/recall need a 3rd neighbour besides the point itself


def npz_keys(path: Path) -> list[str]:
    """Array names in an npz, without opening any of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as error:
        raise ConfigurationError(f"{path} is not a readable .npz file ({error})") from error


def _read_header(handle, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(handle)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(handle)
    except ValueError as error:
        raise ConfigurationError(f"{where} is not a valid .npy array ({error})") from error
    raise ConfigurationError(f"{where} uses .npy format version {version}, which is not supported")


class NpzImages:
    """An image array inside an npz, checked on open and read in batches.

    The array must be uint8 of shape (N, H, W, 3) with N >= ``min_images``: the layout ADM's
    evaluator and ``sample.py`` use.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key: str = "arr_0",
        role: str = "sample batch",
        min_images: int = MIN_IMAGES,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.member = f"{key}.npy"
        if not self.path.is_file():
            raise ConfigurationError(f"{role} {self.path} does not exist")
        keys = npz_keys(self.path)
        if key not in keys:
            raise ConfigurationError(
                f"{role} {self.path} has no array {key!r} (expected uint8 images of shape "
                f"(N, H, W, 3) under {key!r}; found {', '.join(map(repr, keys)) or 'no arrays'})"
            )
        where = f"{role} {self.path} [{key}]"
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as handle:
                shape, fortran_order, dtype = _read_header(handle, where)
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise ConfigurationError(f"{where} is damaged ({error})") from error
        if dtype != np.uint8:
            raise ConfigurationError(
                f"{where} holds {dtype} images; expected uint8 values 0..255 "
                f"(convert with np.clip(np.round(x), 0, 255).astype(np.uint8) if x is in 0..255)"
            )
        if len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
            raise ConfigurationError(
                f"{where} has shape {list(shape)}; expected (N, H, W, 3) RGB images in NHWC order"
            )
        if fortran_order:
            raise ConfigurationError(f"{where} is stored in Fortran order; expected C order")
        if shape[0] < min_images:
            raise ConfigurationError(
                f"{where} holds {shape[0]} images; at least {min_images} are needed "
                f"(precision/recall use each image's 3rd nearest neighbour)"
            )
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.shape[3]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 batches in file order; only one batch is held at a time."""
        if batch_size < 1:
            raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")
        try:
            yield from self._batches(batch_size)
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise ConfigurationError(f"{self.path} [{self.key}] is damaged ({error})") from error

    def _batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as handle:
            _read_header(handle, str(self.path))
            remaining = len(self)
            while remaining:
                count = min(batch_size, remaining)
                buffer = bytearray(count * self.image_bytes)  # writable, for torch.from_numpy
                filled = _read_into(handle, buffer)
                if filled != len(buffer):
                    got = len(self) - remaining + filled // self.image_bytes
                    raise ConfigurationError(
                        f"{self.path} [{self.key}] ends early: its header promises {len(self)} "
                        f"images, the data holds {got}"
                    )
                yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])
                remaining -= count


def _read_into(handle, buffer: bytearray) -> int:
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n = handle.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def read_small_arrays(path: Path, keys: list[str], role: str) -> dict[str, np.ndarray]:
    """Load the named (small) arrays of an npz safely; absent keys are left out."""
    present = set(npz_keys(path))
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in keys:
                if key in present:
                    out[key] = np.asarray(archive[key])
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ConfigurationError(f"{role} {path}: cannot read {keys} ({error})") from error
    return out
