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
