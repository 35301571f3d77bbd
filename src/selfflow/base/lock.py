"""One run per output folder: rank 0 holds an exclusive ``flock`` on ``DIR/.lock``.

Two runs in one folder would break each other: each one's set-up deletes the temporaries of
the other's files in flight, and both would write the same shards, checkpoints or npz. So
``sample``, ``prepare`` and ``train`` all take this one lock (it lives in the base, beside
:mod:`selfflow.base.files`, for that reason): rank 0 takes
the lock before it touches anything in the folder and keeps it until the run ends; a second
run is refused at once, naming the command that holds the folder (``selfflow train``,
``prepare`` or ``sample``, written into the file with its pid, host and start time). The lock
belongs to the open file, so the
kernel frees it when the process dies, even by SIGKILL: a killed run never blocks a restart.
(On NFS, Linux maps ``flock`` to a POSIX lock that all clients see.)

The file is deleted when the run ends. A run that opened it just before that could lock the
deleted file, so after locking, the holder checks that the path still names the file it locked,
and starts again if not.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from selfflow.base.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # no flock on this platform (Windows): runs are not guarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class FolderBusyError(ConfigurationError):
    """Another run holds the folder's lock."""


class FolderLock:
    """An exclusive, non-blocking lock on ``folder/.lock`` (use as a context manager)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        command: str = "selfflow sample",
        option: str = "--output-dir",
    ) -> None:
        self.folder = Path(folder)
        self.command = command  # recorded in the file: what a refused run is told holds it
        self.option = option  # the refused run's option that picks the folder
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if fcntl is None or self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise busy_error(self.folder, holder, self.option) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file that the previous holder deleted meanwhile: again
        os.ftruncate(fd, 0)
        holder = {
            "command": self.command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd
        return self

    def drop_in_child(self, *_: object) -> None:
        """In a forked child (a data-loader worker): close the inherited descriptor, keeping
        the parent's lock. A child that outlives a killed parent would otherwise hold the
        lock until it exits, and refuse the restart."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: nobody else can hold this file
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """Who holds the lock, in words: "`selfflow train` (pid 1234 on HOST, started …)"."""
    try:
        text = os.pread(fd, 1000, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    try:
        found = json.loads(text)
        return (
            f"`{found['command']}` (pid {found['pid']} on {found['host']}, started "
            f"{found['started']})"
        )
    except (ValueError, TypeError, KeyError):  # written by an older selfflow, or cut short
        return f"another selfflow process (pid {text or 'unknown'})"


def busy_error(folder: str | os.PathLike, holder: str, option: str) -> FolderBusyError:
    """The refusal of a run whose folder ``holder`` (from :func:`lock_holder`) is using."""
    return FolderBusyError(
        f"{folder} is in use by {holder}; wait for it to end or stop it, or choose another {option}"
    )


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock (its command, pid, host and start), or None; reads only,
    creates nothing.

    For checks that must not take the lock (a dry run): a shared ``flock`` on a read-only
    descriptor fails at once while another process holds the exclusive one.
    """
    path = Path(folder) / LOCK_NAME
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable): nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
