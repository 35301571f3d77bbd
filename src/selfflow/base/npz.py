"""Write and read arrays inside ``.npz`` files one block of rows at a time.

``np.savez`` needs the whole array in memory and ``np.load(...)["arr_0"]`` returns it whole: 50 000
images of 256 × 256 × 3 are 9.8 GB. An ``.npz`` is only a zip archive of ``.npy`` files, and a
``.npy`` file is a short text header followed by the raw bytes in C order. So the writer puts the
header first (the shape is known in advance) and streams the rows after it, uncompressed as
``np.savez`` does; the reader parses the header inside the zip and then reads a block of rows at a
time (stored and deflated members alike). Memory is one block, whatever the array's size.

The batch sampler writes ``samples_N.npz`` with :class:`NpzStreamWriter`; the sampler and the
evaluator read with :class:`NpzArray`. Only numpy and the standard library are used, so neither
path imports torch here.
"""

from __future__ import annotations

import ast
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.base.errors import ConfigurationError

NPY_MAGIC = b"\x93NUMPY"
_ALIGN = 64  # numpy aligns the start of the data to 64 bytes
_MAX_HEADER = 10_000  # np.load's limit too: a longer header is refused, not parsed
_VERIFY_BLOCK = 1 << 24
# What reading a damaged zip can raise besides BadZipFile: EOFError and zlib.error on cut or
# garbled data, OSError when a garbled directory sends a seek before the start of the file,
# NotImplementedError for an unknown compression method, RuntimeError for an "encrypted"
# flag, struct.error / ValueError / OverflowError / UnicodeDecodeError on garbled fields.
# Each is reported as damage, naming the file; MemoryError and interrupts are not damage.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    OSError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    ValueError,
    OverflowError,
    UnicodeDecodeError,
)


# --- the .npy header ----------------------------------------------------------------------------


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
    """Parse a ``.npy`` header (formats 1.0, 2.0, 3.0) from a file-like object at its start.

    Raises ``ValueError`` saying what is wrong; the stream is left at the start of the data.
    """
    magic = stream.read(8)
    if len(magic) != 8 or magic[:6] != NPY_MAGIC:
        raise ValueError("not a .npy file: the magic string \\x93NUMPY is missing")
    major = magic[6]
    if major == 1:
        (length,) = struct.unpack("<H", _read_exactly(stream, 2))
    elif major in (2, 3):
        (length,) = struct.unpack("<I", _read_exactly(stream, 4))
    else:
        raise ValueError(f"unknown .npy format version {major}.{magic[7]}")
    if length > _MAX_HEADER:
        raise ValueError(f"the .npy header is {length} bytes long; at most {_MAX_HEADER} are read")
    text = _read_exactly(stream, length).decode("utf8" if major == 3 else "latin1")
    try:
        fields = ast.literal_eval(text)
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"unreadable .npy header {text!r}") from error
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"a .npy header must hold descr, fortran_order and shape; got {text!r}")
    shape = fields["shape"]
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"bad shape in .npy header: {shape!r}")
    if not isinstance(fields["fortran_order"], bool):
        raise ValueError(f"bad fortran_order in .npy header: {fields['fortran_order']!r}")
    try:
        dtype = np.dtype(fields["descr"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad descr in .npy header: {fields['descr']!r}") from error
    return NpyInfo(shape, dtype, fields["fortran_order"])


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("the .npy header is truncated")
    return data


# --- reading ------------------------------------------------------------------------------------


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names in an npz, without opening any of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    except ARCHIVE_ERRORS as error:
        raise ConfigurationError(f"{path} is not a readable .npz file ({error})") from error


class NpzArray:
    """One array inside an npz: its header is read and checked on opening, its rows on demand.

    Every problem with the file (no such array, a bad header, damaged or missing data) raises
    :class:`ConfigurationError` naming ``label`` (default: the path) and the key. Subclasses add
    their own checks on ``shape`` and ``dtype`` and may call rows something else (``row_name``).
    """

    row_name = "rows"

    def __init__(
        self, path: str | os.PathLike, key: str = "arr_0", *, label: str | None = None
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.where = f"{label or self.path} [{key}]"
        keys = npz_keys(self.path)
        if key not in keys:
            raise ConfigurationError(f"{label or self.path} has no array {key!r}; it holds {keys}")
        with self._open() as stream:
            self.info = self._header(stream)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"{self.where} is a scalar; it has no length")
        return self.shape[0]

    @contextmanager
    def _open(self) -> Iterator[zipfile.ZipExtFile]:
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as stream:
                yield stream
        except ConfigurationError:
            raise  # the reader's own finding, already worded
        except ARCHIVE_ERRORS as error:
            raise ConfigurationError(
                f"{self.where} is damaged ({type(error).__name__}: {error})"
            ) from error

    def verify(self, on_bytes: Callable[[int], None] | None = None) -> None:
        """Read the whole member once: zipfile checks its CRC-32 at the end, and the data must
        be exactly as long as the header's shape and dtype say. Memory: one 16 MB block."""
        expected = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        found = 0
        with self._open() as stream:
            self._header(stream)
            while block := stream.read(_VERIFY_BLOCK):
                found += len(block)
                if on_bytes is not None:
                    on_bytes(len(block))
        if found != expected:
            raise ConfigurationError(
                f"{self.where} holds {found} bytes of data; its header ({self.dtype} "
                f"{self.shape}) needs {expected}"
            )

    def _header(self, stream) -> NpyInfo:
        try:
            return read_npy_header(stream)
        except ValueError as error:
            raise ConfigurationError(f"{self.where} is not a valid .npy array ({error})") from error

    def rows(self, rows_per_block: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most ``rows_per_block`` rows, in file order.

        Only one block is held at a time; each is a fresh writable array (``torch.from_numpy``
        takes it as is). The zip member's CRC is checked when its last byte is read, so a damaged
        file is reported by the end of the iteration at the latest.
        """
        if rows_per_block <= 0:
            raise ValueError(f"rows_per_block must be positive; got {rows_per_block}")
        if self.info.fortran_order:
            raise ConfigurationError(f"{self.where} is stored in Fortran order; expected C order")
        if not self.shape:
            raise ConfigurationError(f"{self.where} is a scalar; there are no rows to stream")
        total, row_bytes = self.shape[0], self.info.row_bytes
        with self._open() as stream:
            self._header(stream)
            done = 0
            while done < total:
                count = min(rows_per_block, total - done)
                buffer = bytearray(count * row_bytes)
                filled = _read_into(stream, buffer)
                if filled != len(buffer):
                    found = done + filled // max(row_bytes, 1)
                    raise ConfigurationError(
                        f"{self.where} ends early: its header promises {total} {self.row_name}, "
                        f"the data holds {found}"
                    )
                yield np.frombuffer(buffer, dtype=self.dtype).reshape(count, *self.shape[1:])
                done += count
            if stream.read(1):
                raise ConfigurationError(
                    f"{self.where} holds more data than its header's shape {self.shape}"
                )


def _read_into(stream, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``stream``; returns how many bytes it got (fewer only at the end)."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> NpyInfo:
    """Shape and dtype of ``key`` in an ``.npz`` without reading its data."""
    return NpzArray(path, key).info


def verify_npz(
    path: str | os.PathLike, label: str | None = None, on_bytes: Callable[[int], None] | None = None
) -> None:
    """Read every array of an npz end to end (CRC-32, data length against header) and raise
    :class:`ConfigurationError` naming the file and the array at the first damage."""
    for key in npz_keys(path):
        NpzArray(path, key, label=label).verify(on_bytes)


def iter_npz_rows(
    path: str | os.PathLike, key: str = "arr_0", rows_per_block: int = 256
) -> Iterator[np.ndarray]:
    """Blocks of at most ``rows_per_block`` rows of ``key``: see :meth:`NpzArray.rows`."""
    return NpzArray(path, key).rows(rows_per_block)


# --- writing ------------------------------------------------------------------------------------


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

    Entries are stored, as ``np.savez`` stores them, so readers (ours, ADM's) can stream them.
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
