"""Small file helpers shared by the checkpoint loader, the downloader and the evaluator.

Only the standard library is imported, so modules that must stay light (the downloader, the
evaluator's file handling) can use them without pulling in torch.
"""

from __future__ import annotations

import hashlib
import os
import threading

HASH_CHUNK = 1 << 22


def file_sha256(
    path: str | os.PathLike, chunk_size: int | None = None, stop: threading.Event | None = None
) -> str | None:
    """Hex sha256 of a file, read in chunks (checkpoints and reference batches are gigabytes).

    With ``stop``, returns ``None`` as soon as the event is set (checked once per chunk), so a
    hash running in the background never holds up an error or Ctrl-C for a 10 GB file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size or HASH_CHUNK):
            if stop is not None and stop.is_set():
                return None
            digest.update(block)
    return digest.hexdigest()


def umask_mode(base: int = 0o666) -> int:
    """The permissions ``open()`` gives a new file: ``base`` less the process's umask.

    ``tempfile.mkstemp`` creates its files readable by their owner only (0600), whatever the
    umask; a file written that way and renamed into place (``metrics.json``, cached reference
    features) would be hidden from collaborators who can read everything else the run wrote.
    Callers ``os.chmod`` their temporary file to this mode before renaming it. The umask is
    read from ``/proc`` where it can be, since setting it to read it races with other threads.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return base & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask
