"""Small file helpers shared by the checkpoint loader, the downloader and the evaluator.

Only the standard library is imported, so modules that must stay light (the downloader, the
evaluator's file handling) can use them without pulling in torch.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints and reference batches are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
