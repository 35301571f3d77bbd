"""The training dataset on disk: fixed-size shards of memory-mappable ``.npy`` arrays + a manifest.

**Layout** of a dataset folder::

    manifest.json              settings, class names, shard list with sha256 (written last)
    labels.npy                 int64 (N,), every image's class, in dataset order
    shards/shard_00000.npy     float32 or float16 (n, K, C, H, W): K = 2 holds the posterior
                               mean and std of each image side by side, K = 1 the data itself
    shards/shard_00000.json    the shard's record: row count, sha256, labels, skipped files

Mean and std of an image sit next to each other, so a training step that draws a random batch
reads one contiguous run of bytes per image. The shard array is memory-mapped, never loaded:
ImageNet's 1.28 M images are 42 GB in float32, and the trainer touches a random few hundred per
step. Labels are small (10 MB) and are read whole.

**Writing.** Every file is written under a hidden temporary name, fsynced and renamed, so a
file with its final name is complete. A shard counts as finished only once its record
(``.json``, written after the array) exists and the array's sha256 matches it; this is what a
resumed ``selfflow prepare`` re-verifies. ``manifest.json`` is written last, once every shard is
finished, and its presence with ``complete: true`` is what makes the folder a dataset.

**Identity.** :attr:`LatentDataset.identity` is a short digest of everything that defines the
data (count, shapes, dtype, VAE, crop, class names, every shard's sha256, the source file list),
so a trainer can store it in its checkpoints and refuse to resume on another dataset.

numpy and torch only: no diffusers, no PIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.base.errors import DatasetError
from selfflow.base.files import atomic_write, file_sha256

FORMAT_NAME = "selfflow-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.npy"
SHARD_DIR = "shards"
STORED_DTYPES = ("float32", "float16")
# 4096 images per shard: 313 shards for ImageNet (128 MB each in float32), few enough to keep
# every shard memory-mapped at once, small enough that a killed run loses seconds of work.
DEFAULT_SHARD_SIZE = 4096
# Manifest fields that define the data; their digest is the dataset's identity.
IDENTITY_FIELDS = (
    "num_images",
    "latent_shape",
    "dtype",
    "has_std",
    "scale",
    "vae",
    "vae_identity",
    "image_size",
    "crop",
    "class_names",
    "files_digest",
    "labels_sha256",
    "shards",
)


# ----------------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (sorted keys: the same data, the same bytes)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def shard_stem(shard_id: int) -> str:
    return f"shard_{shard_id:05d}"


def shard_array_path(out_dir: Path, shard_id: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{shard_stem(shard_id)}.npy"


def shard_record_path(out_dir: Path, shard_id: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{shard_stem(shard_id)}.json"


def write_shard(
    out_dir: Path,
    shard_id: int,
    rows: np.ndarray,
    labels: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one shard's array, then its record; returns the record.

    ``rows`` is ``(n, K, C, H, W)`` in the stored dtype. ``extra`` (skipped files, upscaled
    count) goes into the record so that the manifest can be assembled from records alone.
    """
    rows = np.ascontiguousarray(rows)
    labels = np.asarray(labels, dtype=np.int64)
    if rows.ndim != 5 or rows.shape[0] != labels.shape[0]:
        raise ValueError(f"shard {shard_id}: rows {rows.shape} do not match labels {labels.shape}")
    array_path = shard_array_path(out_dir, shard_id)
    atomic_write(array_path, lambda handle: np.save(handle, rows, allow_pickle=False))
    record = {
        "id": shard_id,
        "file": f"{SHARD_DIR}/{array_path.name}",
        "count": int(rows.shape[0]),
        "sha256": file_sha256(array_path),
        "labels": labels.tolist(),
        **(extra or {}),
    }
    write_json(shard_record_path(out_dir, shard_id), record)
    return record


def read_shard_record(out_dir: Path, shard_id: int) -> dict[str, Any] | None:
    """The record of a finished shard, or None if it is missing, unreadable or does not match
    its array (wrong sha256, shape or count): such a shard must be redone."""
    try:
        record = json.loads(shard_record_path(out_dir, shard_id).read_text("utf-8"))
        array_path = Path(out_dir) / record["file"]
        if record["id"] != shard_id or len(record["labels"]) != record["count"]:
            return None
        if file_sha256(array_path) != record["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def dataset_identity(manifest: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the fields that define the data (not paths, not versions)."""
    core = {name: manifest.get(name) for name in IDENTITY_FIELDS}
    core["shards"] = [(s["count"], s["sha256"]) for s in manifest.get("shards", [])]
    if manifest.get("latent") is not None:  # the latent convention (absent before it existed)
        core["latent"] = manifest["latent"]
    text = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def finalize(out_dir: Path, header: dict[str, Any], records: Sequence[dict[str, Any]]) -> Path:
    """Write ``labels.npy`` and ``manifest.json`` from the finished shards' records.

    ``header`` holds the settings (shapes, dtype, VAE, crop, class names, source, ...); the
    shard list, image count, skipped files and upscaled count are taken from the records.
    """
    from selfflow.base.version import __version__

    out_dir = Path(out_dir)
    records = sorted(records, key=lambda r: r["id"])
    labels = np.asarray([label for r in records for label in r["labels"]], dtype=np.int64)
    atomic_write(out_dir / LABELS_NAME, lambda handle: np.save(handle, labels, allow_pickle=False))
    manifest = {
        **header,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "complete": True,
        "num_images": int(labels.shape[0]),
        "labels_sha256": labels_sha256(labels),
        "shards": [
            {"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in records
        ],
        "skipped": list(header.get("skipped", []))
        + [entry for r in records for entry in r.get("skipped", [])],
        "upscaled": int(sum(r.get("upscaled", 0) for r in records)),
    }
    manifest["identity"] = dataset_identity(manifest)
    return write_json(out_dir / MANIFEST_NAME, manifest)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _check_arrays(
    means: np.ndarray, labels: np.ndarray, stds: np.ndarray | None, class_names: list[str] | None
) -> list[str]:
    """Validate write_dataset's inputs; returns the class names (default ``"0" … "K-1"``)."""
    if means.ndim != 4 or means.shape[0] == 0:
        raise DatasetError(f"means must be (N, C, H, W) with N >= 1; got shape {means.shape}")
    if not np.issubdtype(means.dtype, np.floating):
        raise DatasetError(f"means must be floating point; got {means.dtype}")
    if stds is not None and stds.shape != means.shape:
        raise DatasetError(f"stds must have the shape of means {means.shape}; got {stds.shape}")
    if labels.shape != (means.shape[0],) or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"labels must be {means.shape[0]} integers (one per image); got {labels.dtype} "
            f"{labels.shape}"
        )
    for name, array in (("means", means), ("stds", stds)):
        if array is not None and not np.isfinite(array).all():
            raise DatasetError(f"{name} contain NaN or inf")
    if labels.min() < 0:
        raise DatasetError(f"labels must be >= 0; found {labels.min()}")
    if class_names is None:
        class_names = [str(k) for k in range(int(labels.max()) + 1)]
    class_names = [str(name) for name in class_names]
    if labels.max() >= len(class_names):
        raise DatasetError(
            f"labels must lie in 0..{len(class_names) - 1} ({len(class_names)} class names); "
            f"found {labels.max()}"
        )
    return class_names


def write_dataset(
    out_dir: str | os.PathLike,
    means: Any,
    labels: Any,
    *,
    stds: Any = None,
    class_names: Sequence[str] | None = None,
    dtype: str = "float32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write arrays as a dataset that :class:`LatentDataset` reads, without any VAE.

    ``means`` ``(N, C, H, W)`` and ``labels`` ``(N,)`` (numpy or torch). Without ``stds`` the
    data is used as it is: the trainer applies no posterior sampling and no scaling
    (``scale`` 1.0), which suits pixel-space experiments, small data sets and tests. With
    ``stds`` the pair is stored like ``selfflow prepare``'s posterior. Refuses a folder that
    already holds a dataset unless ``overwrite``. Returns ``out_dir`` (what
    :class:`~selfflow.data.LatentDataset` opens).
    """
    out_dir = Path(out_dir)
    means_np, labels_np = _as_numpy(means), _as_numpy(labels)
    stds_np = None if stds is None else _as_numpy(stds)
    names = _check_arrays(
        means_np, labels_np, stds_np, None if class_names is None else list(class_names)
    )
    if dtype not in STORED_DTYPES:
        raise DatasetError(f"dtype must be one of {STORED_DTYPES}; got {dtype!r}")
    if (out_dir / MANIFEST_NAME).exists() or (out_dir / SHARD_DIR).exists():
        if not overwrite:
            raise DatasetError(
                f"{out_dir} already holds a dataset; pass overwrite=True to replace it"
            )
        clear_dataset(out_dir)
    parts = [means_np] if stds_np is None else [means_np, stds_np]
    records = []
    for shard_id, start in enumerate(range(0, means_np.shape[0], shard_size)):
        stop = min(start + shard_size, means_np.shape[0])
        rows = np.stack([p[start:stop] for p in parts], axis=1).astype(dtype)
        records.append(write_shard(out_dir, shard_id, rows, labels_np[start:stop]))
    header = {
        "latent_shape": list(means_np.shape[1:]),
        "dtype": dtype,
        "has_std": stds_np is not None,
        "scale": 1.0,
        "vae": None,
        "vae_identity": None,
        "image_size": None,
        "crop": None,
        "class_names": names,
        "files_digest": None,
        "source": None,
        "shard_size": shard_size,
    }
    finalize(out_dir, header, records)
    return out_dir


def stored_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest a dataset writer left in ``out_dir`` (finished or not), or None; an
    unreadable one, or another kind (a sample batch's ``manifest.json``), is refused."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(
            f"{path} is unreadable ({type(error).__name__}: {error}); pass --overwrite to start over"
        ) from error
    if not isinstance(stored, dict) or stored.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a selfflow dataset manifest; choose another OUT_DIR")
    return stored


def foreign_entries(out_dir: Path) -> list[str]:
    """What ``out_dir`` holds besides a dataset's own files (folders as ``name/``), hidden
    entries (the lock, temporaries, ``.DS_Store``) aside: what a writer must not mix with."""
    ours = {MANIFEST_NAME, LABELS_NAME, SHARD_DIR}
    return sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in os.scandir(out_dir)
        if entry.name not in ours and not entry.name.startswith(".")
    )


def clear_dataset(out_dir: Path) -> None:
    """Remove what a dataset writer put in ``out_dir`` (and nothing else)."""
    out_dir = Path(out_dir)
    for name in (MANIFEST_NAME, LABELS_NAME):
        (out_dir / name).unlink(missing_ok=True)
    shards = out_dir / SHARD_DIR
    if shards.is_dir():
        for entry in os.scandir(shards):
            ours = entry.name.endswith((".npy", ".json")) or ".tmp-" in entry.name
            if ours and entry.is_file():
                os.unlink(entry.path)
        with contextlib.suppress(OSError):  # left in place if it holds the user's own files
            shards.rmdir()


# ----------------------------------------------------------------------------------------------
# Reading


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a finished dataset, or a :class:`DatasetError` that says what is wrong."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise DatasetError(f"dataset folder {out_dir} does not exist")
    if not out_dir.is_dir():
        raise DatasetError(f"{out_dir} is a file, not a dataset folder")
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        pending = (
            len(list((out_dir / SHARD_DIR).glob("*.json"))) if (out_dir / SHARD_DIR).is_dir() else 0
        )
        hint = (
            f"it holds {pending} finished shards of an unfinished `selfflow prepare`: rerun "
            f"the same command to complete it"
            if pending
            else "expected a folder written by `selfflow prepare` or selfflow.data.write_dataset"
        )
        raise DatasetError(f"{out_dir} is not a dataset: no {MANIFEST_NAME} ({hint})")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path} is damaged ({type(error).__name__}: {error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a selfflow dataset manifest (no format {FORMAT_NAME!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {manifest.get('format_version')!r}; this selfflow "
            f"reads version {FORMAT_VERSION}"
        )
    if manifest.get("complete") is not True:
        raise DatasetError(
            f"{out_dir} holds an unfinished `selfflow prepare`: rerun the same command to "
            f"complete it"
        )
    missing = [name for name in IDENTITY_FIELDS + ("identity",) if name not in manifest]
    if missing:
        raise DatasetError(f"{path} is damaged: missing fields {missing}")
    if manifest["identity"] != dataset_identity(manifest):
        raise DatasetError(
            f"{path} is damaged: its contents do not match its identity {manifest['identity']}"
        )
    return manifest
