"""The output folder of an FID batch: checked, created, cleared and tidied.

Only files that a batch writes are ever deleted (:func:`clear_output_dir`), and a set-up that
fails removes only the empty folders it created (:func:`remove_empty_folders`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.files import folder_sha256, remove_temporaries
from selfflow.batch import store
from selfflow.batch.manifest import MANIFEST_NAME


def prepare_output_dir(path: Path) -> None:
    """Make sure ``path`` is a writable folder (created if missing), or say why it is not."""
    if path.exists() and not path.is_dir():
        raise ConfigurationError(
            f"--output-dir {path} is a file; expected a folder (created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create --output-dir {path}: {error.strerror or error}"
        ) from error
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise ConfigurationError(
            f"--output-dir {path} is not writable: {error.strerror or error}"
        ) from error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, if any."""
    missing = None
    for folder in [path, *path.absolute().parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty_folders(path: Path, up_to: Path) -> None:
    """Remove ``path`` and its parents up to ``up_to`` while they are empty (never anything else)."""
    for leftover in path.glob(f"{distributed.SHARED_CHECK_PREFIX}*") if path.is_dir() else []:
        leftover.unlink(missing_ok=True)
    for folder in [path.absolute(), *path.absolute().parents]:
        try:
            folder.rmdir()  # fails on a folder that holds anything
        except OSError:
            return
        if folder == up_to.absolute():
            return


def any_shard_files(output_dir: Path) -> list[str]:
    """The names of the shard files in ``output_dir`` (a folder without a manifest is refused)."""
    folder = output_dir / store.SHARD_DIR
    if not folder.is_dir():
        return []
    return [
        e.name
        for e in os.scandir(folder)
        if e.name.startswith("shard_") and e.name.endswith(".npz")
    ]


def clear_output_dir(output_dir: Path) -> int:
    """Delete what a previous run wrote (and only that): manifest, shards, npz, grid, PNGs."""
    removed = 0
    candidates = [output_dir / MANIFEST_NAME, output_dir / "grid.png", output_dir / "metrics.json"]
    candidates += list(output_dir.glob("samples_*.npz"))
    for folder, pattern in ((store.SHARD_DIR, "*.npz"), (store.IMAGE_DIR, "*.png")):
        if (output_dir / folder).is_dir():
            candidates += [
                p
                for p in (output_dir / folder).glob(pattern)
                if p.stem.removeprefix("shard_").isdigit()
            ]
    for path in candidates:
        if path.is_file():
            path.unlink()
            removed += 1
    removed += remove_temporaries([output_dir, output_dir / store.SHARD_DIR])
    return removed


def vae_identity(name: str) -> str:
    """A hub id as given; a local folder by the sha256 of its files (its path may move)."""
    folder = Path(name).expanduser()
    if not folder.exists():
        return name
    return f"local folder sha256:{folder_sha256(folder)}"


def torch_version() -> str:
    """The torch version, recorded in the manifest."""
    import torch

    return torch.__version__
