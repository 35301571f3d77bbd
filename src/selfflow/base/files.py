"""Small file helpers shared by every module that writes or checks files.

Every finished file is written the same way: to a hidden temporary name beside it
(:func:`temporary_name`), then renamed into place with ``os.replace``, so a reader never sees
half a file and a killed writer leaves only a temporary that :func:`remove_temporaries`
recognises and deletes. A write the file system refuses (read-only, full, over quota, no
permission) becomes one :class:`~selfflow.base.errors.CannotWriteError` that names the file, the
reason and the free space (:func:`writing`, used by every atomic write; the CLI applies
:func:`write_failure` to any OSError that escapes), so no command ends such a case in a
traceback, and what was finished stays for the rerun.

Only the standard library is imported, so modules that must stay light (the downloader, the
evaluator's file handling) can use them without pulling in torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from selfflow.base.errors import CannotWriteError, ConfigurationError, DiskFullError

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
        with writing(path, temporary=tmp):
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
    with writing(path):
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
    if _read_only(found):
        raise ConfigurationError(
            f"{what}: {found} is on a read-only file system (mounted at {mount_point(found)})"
        )
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{what}: {found} is not writable by this user")


# -- failed writes ---------------------------------------------------------------------------------

# errno values that say the file system refused a write, whoever made it
WRITE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)
# What writers that drop the errno say when a write stops short: torch.save's zip writer
# ("[enforce fail at inline_container.cc] unexpected pos 576 vs 534", "file write failed")
# and numpy's ``tofile`` ("200000 requested and 32752 written").
_SHORT_WRITE = re.compile(r"unexpected pos \d+|file write failed|requested and \d+ written")
_RUST_IO_ERROR = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system that holds ``path`` (or would hold it)."""
    found = nearest_existing(path)
    while not os.path.ismount(found) and found != found.parent:
        found = found.parent
    return found


def _read_only(folder: Path) -> bool:
    """Whether ``folder``'s file system is mounted read-only (``os.access`` cannot tell that
    from a permission, and root passes ``os.access`` on a read-only mount of some kinds)."""
    flag = getattr(os, "ST_RDONLY", None)
    try:
        return flag is not None and bool(os.statvfs(folder).f_flag & flag)
    except (OSError, AttributeError):
        return False


def _size(count: int) -> str:
    """A byte count in decimal units, as ``df -H`` shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _error_code(error: BaseException) -> tuple[int | None, str | None]:
    """``(errno, filename)`` of the first OSError in the chain that carries an errno, else
    the errno a Rust writer (safetensors) prints, ``(os error 28)`` or ``Os { code: 28 }``.

    torch.save writing to a file object reports the object's OSError as a RuntimeError whose
    context is the OSError; following the chain recovers the exact cause.
    """
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno, seen.filename if isinstance(seen.filename, str) else None
        seen = seen.__cause__ or seen.__context__
    rust = _RUST_IO_ERROR.search(str(error))
    return (int(rust.group(1) or rust.group(2)), None) if rust else (None, None)


def _final_name(name: str) -> Path:
    """``path`` for a name :func:`temporary_name` made from it; other names unchanged."""
    path = Path(name)
    if not is_temporary_name(path.name):
        return path
    return path.with_name(path.name[1:].rsplit(TEMPORARY_MARK, 1)[0])


def write_failure(path: str | os.PathLike | None, error: BaseException) -> CannotWriteError | None:
    """The one-line error for ``error`` raised while writing ``path``, or None when ``error``
    is not the file system refusing a write (a bug, a damaged input: those stay as they are).

    The line names the file (the one the OSError names when it is another, the final name
    rather than a temporary), the reason, the free space and mount point on a full disk, and
    what to do: what was finished is kept, so the same command continues once the cause is
    gone. With ``path`` None (the CLI's last resort) the OSError's own file name is used.
    """
    code, filename = _error_code(error)
    named = None if filename is None else _final_name(filename)
    # a refused permission may be a read; only the file being written is surely written
    writes = code in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) or (
        path is not None and named in (None, Path(path))
    )
    path = named if named is not None else path
    if code is None:
        if path is None or not _SHORT_WRITE.search(str(error)):
            return None
        code = errno.EROFS if _read_only(nearest_existing(path)) else errno.ENOSPC
    if code not in WRITE_ERRNOS:
        return None
    if path is None:
        unnamed = CannotWriteError(f"a file could not be written: {os.strerror(code)}")
        unnamed.errno = code
        return unnamed
    path = Path(path)
    mount = mount_point(path)
    folder = nearest_existing(path.parent)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_size(shutil.disk_usage(nearest_existing(path)).free)} free in {mount}"
        except OSError:
            free = f"on {mount}"
        what = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        failure: CannotWriteError = DiskFullError(
            f"cannot write {path}: {what} ({free}); what was finished is kept: free space and "
            f"rerun the same command to continue"
        )
    else:
        what = f"{mount} is a read-only file system" if code == errno.EROFS else "permission denied"
        todo = (
            f"make {folder} writable and rerun the same command, or choose another folder"
            if writes
            else "check its permissions and rerun the same command"
        )
        failure = CannotWriteError(
            f"cannot {'write' if writes else 'access'} {path}: {what}; what was finished is "
            f"kept: {todo}"
        )
    failure.errno, failure.filename = code, str(path)
    return failure


@contextlib.contextmanager
def writing(path: str | os.PathLike, temporary: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn the file system's refusal to write ``path`` (read-only, full, quota, permission;
    an OSError, or torch.save's RuntimeError) into a :class:`CannotWriteError` that says so in
    one line; other errors pass unchanged. ``temporary`` is deleted first, so that the free
    space reported is what a rerun will find."""
    try:
        yield
    except CannotWriteError:
        raise
    except Exception as error:  # OSError; RuntimeError (torch.save); SafetensorError
        if write_failure(path, error) is None:
            raise
        # torch.save's zip writer keeps the temporary open from the frames of the failed call
        # (a deleted file's blocks stay in use until then): drop them, delete the temporary,
        # and only then measure the free space the message reports
        seen: BaseException | None = error
        for _ in range(10):
            if seen is None:
                break
            traceback.clear_frames(seen.__traceback__)
            seen = seen.__cause__ or seen.__context__
        if temporary is not None:
            with contextlib.suppress(OSError):
                Path(temporary).unlink(missing_ok=True)
        raise write_failure(path, error) from error  # type: ignore[misc]
