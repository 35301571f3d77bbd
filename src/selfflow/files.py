"""Small file helpers shared by every module that writes or checks files.

Every finished file is written the same way: to a hidden temporary name beside it
(:func:`temporary_name`), then renamed into place with ``os.replace``, so a reader never sees
half a file and a killed writer leaves only a temporary that :func:`remove_temporaries`
recognises and deletes.

Only the standard library is imported, so modules that must stay light (the downloader, the
evaluator's file handling) can use them without pulling in torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from selfflow.errors import ConfigurationError

HASH_CHUNK = 1 << 22


def file_sha256(
    path: str | os.PathLike, chunk_size: int | None = None, stop: threading.Event | None = None
) -> str | None:
    """Hex sha256 of a file, read in chunks (checkpoints and reference batches are gigabytes).

    With ``stop``, returns ``None`` as soon as the event is set (checked once per chunk), so a
    hash running in the background never holds up an error or Ctrl-C for a 10 GB file.
    """
    digest = hashlib.sha256()
    if not _hash_into(digest, path, chunk_size or HASH_CHUNK, stop):
        return None
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over a folder's files: each relative path, a NUL, then its bytes, in sorted order.

    It names a folder by content, not by where it lies (a local VAE copied elsewhere keeps it).
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        _hash_into(digest, path, HASH_CHUNK, None)
    return digest.hexdigest()


def _hash_into(
    digest: Any, path: str | os.PathLike, chunk: int, stop: threading.Event | None
) -> bool:
    """Feed a file to ``digest`` chunk by chunk; False when ``stop`` was set on the way."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if stop is not None and stop.is_set():
                return False
            digest.update(block)
    return True


TEMPORARY_MARK = ".tmp-"


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name beside ``path`` that no reader of finished files ever looks at."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one that :func:`temporary_name` makes."""
    return name.startswith(".") and TEMPORARY_MARK in name


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    The temporary is deleted whatever happens; with ``fsync`` its bytes reach the disk before
    the rename, so a crash leaves the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a hidden temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def remove_temporaries(folders: Iterable[str | os.PathLike]) -> int:
    """Delete the temporary files that killed writers left in ``folders``; returns how many."""
    removed = 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for entry in os.scandir(folder):
            if is_temporary_name(entry.name) and entry.is_file():
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else its nearest existing parent: where a file or folder that is
    not created yet would be written."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def check_can_write(folder: str | os.PathLike, what: str) -> None:
    """Refuse ``folder`` (created later if missing) when nothing could be written there: its
    nearest existing part must be a folder this user may write into. Checked before long work,
    so that a typo fails at once; ``what`` names the option in the error (``--out x.png``)."""
    found = nearest_existing(folder)
    if not found.is_dir():
        raise ConfigurationError(f"{what}: {found} is a file, not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what}: {found} is not writable by this user")
