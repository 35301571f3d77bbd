"""Write and read ``.npz`` files one block of rows at a time.

``np.savez`` needs the whole array in memory: 50 000 images of 256 × 256 × 3 are 9.8 GB. An
``.npz`` is only a zip archive of ``.npy`` files, and a ``.npy`` file is a short text header
followed by the raw bytes in C order, so the header can be written first (the shape is known in
advance) and the rows streamed after it. Entries are stored uncompressed, as ``np.savez`` does,
which is what lets ADM's evaluator read ``arr_0`` in batches by parsing the header inside the zip.

Only numpy and the standard library are used here, so assembling a batch never imports torch.
"""

from __future__ import annotations

import ast
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.errors import ConfigurationError

NPY_MAGIC = b"\x93NUMPY"
_ALIGN = 64  # numpy aligns the start of the data to 64 bytes


def npy_header(shape: tuple[int, ...], dtype: np.dtype | str) -> bytes:
    """The ``.npy`` (format 1.0) header of a C-ordered array of ``shape`` and ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"only plain numeric dtypes are supported; got {dtype}")
    shape = tuple(int(n) for n in shape)
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    # magic (6) + version (2) + length (2) + text + padding + newline, a multiple of 64 in all
    padding = -(10 + len(text) + 1) % _ALIGN
    body = (text + " " * padding + "\n").encode("latin1")
    if len(body) > 0xFFFF:
        raise ValueError(f"shape {shape} makes a header too long for .npy format 1.0")
    return NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(body)) + body


@dataclass(frozen=True)
class NpyInfo:
    """What a ``.npy`` header says: enough to read the data that follows it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def read_npy_header(stream) -> NpyInfo:
    """Parse a ``.npy`` header (formats 1.0, 2.0, 3.0) from a file-like object at its start."""
    magic = stream.read(8)
    if len(magic) != 8 or magic[:6] != NPY_MAGIC:
        raise ValueError("not a .npy file: the magic string \\x93NUMPY is missing")
    major = magic[6]
    if major == 1:
        (length,) = struct.unpack("<H", stream.read(2))
    elif major in (2, 3):
        (length,) = struct.unpack("<I", stream.read(4))
    else:
        raise ValueError(f"unknown .npy format version {major}.{magic[7]}")
    raw = stream.read(length)
    if len(raw) != length:
        raise ValueError("the .npy header is truncated")
    text = raw.decode("utf8" if major == 3 else "latin1")
    try:
        fields = ast.literal_eval(text)
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"unreadable .npy header {text!r}") from error
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"a .npy header must hold descr, fortran_order and shape; got {text!r}")
    shape = fields["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"bad shape in .npy header: {shape!r}")
    return NpyInfo(shape, np.dtype(fields["descr"]), bool(fields["fortran_order"]))


class _EntryWriter:
    """Rows streamed into one zip entry; refuses to close short of the declared size."""

    def __init__(self, handle, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._handle = handle
        self.shape = shape
        self.dtype = dtype
        self.rows_written = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.dtype != self.dtype or tuple(rows.shape[1:]) != self.shape[1:]:
            raise ValueError(
                f"expected rows of {self.dtype} {self.shape[1:]}; got {rows.dtype} {rows.shape[1:]}"
            )
        if self.rows_written + len(rows) > self.shape[0]:
            raise ValueError(
                f"too many rows: {self.rows_written} + {len(rows)} > {self.shape[0]} declared"
            )
        self._handle.write(np.ascontiguousarray(rows).data)
        self.rows_written += len(rows)


class NpzStreamWriter:
    """An uncompressed ``.npz`` written entry by entry, each entry row block by row block.

    >>> with NpzStreamWriter(path) as npz, npz.array("arr_0", (n, h, w, 3), np.uint8) as out:
    ...     for block in blocks:
    ...         out.write(block)

    Peak memory is one block, whatever the array's size.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    @contextmanager
    def array(self, name: str, shape: tuple[int, ...], dtype) -> Iterator[_EntryWriter]:
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        # force_zip64: the entry's size is unknown to zipfile in advance and may exceed 4 GiB.
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as handle:
            handle.write(npy_header(shape, dtype))
            entry = _EntryWriter(handle, shape, dtype)
            yield entry
            if entry.rows_written != shape[0]:
                raise ValueError(
                    f"{name}: {entry.rows_written} rows written, {shape[0]} declared in its header"
                )

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzStreamWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> NpyInfo:
    """Shape and dtype of ``key`` in an ``.npz`` without reading its data."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, key, path) as stream:
        return read_npy_header(stream)


def _open_member(archive: zipfile.ZipFile, key: str, path) -> zipfile.ZipExtFile:
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = [n.removesuffix(".npy") for n in archive.namelist()]
        raise ConfigurationError(f"{path} has no array {key!r}; it holds {keys}")
    return archive.open(name)


def iter_npz_rows(
    path: str | os.PathLike, key: str = "arr_0", rows_per_block: int = 256
) -> Iterator[np.ndarray]:
    """Blocks of at most ``rows_per_block`` rows of ``key``, read without loading the whole array.

    The zip member's CRC is checked when its last byte is read, so a damaged file raises
    ``zipfile.BadZipFile`` at the end of the iteration at the latest.
    """
    if rows_per_block <= 0:
        raise ValueError(f"rows_per_block must be positive; got {rows_per_block}")
    with zipfile.ZipFile(path) as archive, _open_member(archive, key, path) as stream:
        info = read_npy_header(stream)
        if info.fortran_order:
            raise ValueError(f"{path}:{key} is stored in Fortran order; rows cannot be streamed")
        if not info.shape:
            raise ValueError(f"{path}:{key} is a scalar; there are no rows to stream")
        total = info.shape[0]
        done = 0
        while done < total:
            count = min(rows_per_block, total - done)
            data = stream.read(count * info.row_bytes)
            if len(data) != count * info.row_bytes:
                raise ValueError(
                    f"{path}:{key} ends after {done + len(data) // max(info.row_bytes, 1)} of "
                    f"{total} rows"
                )
            yield np.frombuffer(data, dtype=info.dtype).reshape((count, *info.shape[1:]))
            done += count
        if stream.read(1):
            raise ValueError(f"{path}:{key} holds more data than its header's shape {info.shape}")
