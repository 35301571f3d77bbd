"""Read-only random access to a dataset folder (see :mod:`selfflow.data.store` for the format).

:class:`LatentDataset` memory-maps the shard arrays and never writes, so any number of training
processes (and their data-loader workers) can read one folder at once. The trainer calls
:meth:`LatentDataset.get_batch` every step with a random global batch: it groups the indices by
shard and reads each shard's rows with one vectorised fancy-index on its memory map.

**Integrity.** Opening checks that every shard file is there with the size its header gives
(no data read), so a missing or truncated shard is refused before a run writes anything.
The shards' contents are checked against the manifest's sha256 by
:meth:`LatentDataset.start_verifying` (the trainer's reads: each shard hashed once, on a
background thread, before any row of it is returned; a resume skips the unchanged shards its
run verified before) and by :func:`selfflow.data.verify.verify_all` (``train --dry-run``,
``prepare --verify``: every shard, every time).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from selfflow.base.errors import DatasetError
from selfflow.data.store import LABELS_NAME, STORED_DTYPES, labels_sha256, read_manifest
from selfflow.model.latents import LatentConvention

if TYPE_CHECKING:
    from selfflow.data.verify import ShardRecord, ShardVerifier

# Memory maps kept open at once; with more shards the least recently used are closed and
# re-opened on demand (each open map holds a file descriptor).
MAX_OPEN_SHARDS = 512


def _convention(manifest: dict[str, Any], shape: tuple[int, ...]) -> LatentConvention:
    """The manifest's latent convention; one written before conventions were recorded holds
    SD-VAE's latents (``prepare`` accepted no other) or raw data (no VAE, scale 1.0)."""
    try:
        if manifest.get("latent") is not None:
            return LatentConvention.from_dict(manifest["latent"])
        size, vae = manifest.get("image_size"), manifest.get("vae")
        factor = int(size) // int(shape[1]) if vae is not None and size else None
        return LatentConvention(
            channels=int(shape[0]), factor=factor, scaling_factor=float(manifest["scale"])
        )
    except (ValueError, TypeError, IndexError, ZeroDivisionError) as error:
        raise DatasetError(f"the dataset's latent convention is damaged: {error}") from error


class LatentDataset:
    """A dataset written by ``selfflow prepare`` or :func:`selfflow.data.write_dataset`.

    ``ds[i]`` is ``(mean, std, label)``: float32 tensors ``(C, H, W)`` and an int. For data
    stored without a posterior (``has_std`` False) ``std`` is a tensor of zeros, so sampling
    ``mean + std·n`` gives the data itself. Stored float16 is returned as float32. The trainer
    brings latents to the model's numbers with :attr:`latent`, the latent convention
    (:mod:`selfflow.model.latents`: the VAE's scaling and shift, any per-channel statistics;
    for raw data a scale of 1.0).
    """

    def __init__(self, root: str | os.PathLike, *, check_files: bool = True) -> None:
        """``check_files``: refuse a shard file that is missing or whose size is not what its
        header says (reads each header; ``prepare --verify`` turns it off to list every
        problem itself)."""
        self.root = Path(root)
        self.manifest: dict[str, Any] = read_manifest(self.root)
        m = self.manifest
        self.class_names: list[str] = [str(name) for name in m["class_names"]]
        self.num_classes: int = len(self.class_names)
        self.latent_shape: tuple[int, int, int] = tuple(int(v) for v in m["latent_shape"])
        self.has_std: bool = bool(m["has_std"])
        self.scale: float = float(m["scale"])
        self.vae: str | None = m["vae"]
        self.identity: str = m["identity"]
        self.dtype: str = m["dtype"]
        self.latent = _convention(m, self.latent_shape)
        if self.dtype not in STORED_DTYPES or len(self.latent_shape) != 3:
            raise DatasetError(
                f"{self.root}: stored dtype {self.dtype!r} / shape {self.latent_shape} are not "
                f"one of {STORED_DTYPES} / (C, H, W)"
            )
        counts = np.asarray([int(s["count"]) for s in m["shards"]], dtype=np.int64)
        self._paths = [self.root / s["file"] for s in m["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._verifier: ShardVerifier | None = None
        self.labels = self._read_labels(int(m["num_images"]))
        if self._starts[-1] != len(self.labels):
            raise DatasetError(
                f"{self.root}: the shards hold {self._starts[-1]} images, the labels "
                f"{len(self.labels)}; the manifest is damaged"
            )
        if check_files:
            self.check_files()

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    def shard_path(self, shard_id: int) -> Path:
        return self._paths[shard_id]

    def _expected_shape(self, shard_id: int) -> tuple[int, ...]:
        count = int(self._starts[shard_id + 1] - self._starts[shard_id])
        return (count, 2 if self.has_std else 1, *self.latent_shape)

    def shard_file_problem(self, shard_id: int) -> str | None:
        """What is wrong with a shard file judged by its header and size alone (missing,
        unreadable, another shape or dtype, truncated or too long), or None."""
        path = self._paths[shard_id]
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(handle)
                offset = handle.tell()
            size = path.stat().st_size
        except FileNotFoundError:
            return f"shard {path} is missing"
        except (OSError, ValueError) as error:
            return f"shard {path} is unreadable ({error})"
        expected = self._expected_shape(shard_id)
        if shape != expected or dtype != np.dtype(self.dtype) or fortran_order:
            return f"shard {path} holds {dtype} {shape}; the manifest says {self.dtype} {expected}"
        needed = offset + int(np.prod(shape)) * dtype.itemsize
        if size != needed:
            state = "truncated" if size < needed else "too long"
            return f"shard {path} is {state}: {size:,} bytes where its header says {needed:,}"
        return None

    def check_files(self) -> None:
        """Every shard file present with the size its header gives, and the shape and dtype
        the manifest gives (headers only: milliseconds per shard, no data read)."""
        problems = [p for k in range(self.num_shards) if (p := self.shard_file_problem(k))]
        if problems:
            more = f" ({len(problems) - 1} more shards too)" if len(problems) > 1 else ""
            raise DatasetError(f"{problems[0]}{more}; {self.repair_hint()}")

    def repair_hint(self) -> str:
        """How to mend missing or damaged shards of this dataset, for error messages."""
        source = self.manifest.get("source")
        if not (isinstance(source, dict) and source.get("root")):
            return "rewrite the dataset (selfflow.data.write_dataset with overwrite=True)"
        held = self.manifest.get("holdout")
        if isinstance(held, dict) and held.get("part") == "val" and held.get("train"):
            # made with its training folder: `prepare` of this folder alone is refused (it
            # holds another dataset) and --overwrite would replace it with a full dataset
            return (
                f"delete the damaged shard files and rerun `selfflow prepare {source['root']} "
                f"{held['train']} --val-per-class {held['per_class']}` (the training folder) "
                f"with the other options that made it: it writes this held-out part beside it "
                f"again, re-checks every shard and re-encodes the missing ones"
            )
        return (
            f"delete the damaged shard files and rerun `selfflow prepare {source['root']} "
            f"{self.root}` with the options that made it: it re-checks every shard and "
            f"re-encodes the missing ones"
        )

    def start_verifying(
        self, indices: Any = None, record: ShardRecord | None = None
    ) -> ShardVerifier:
        """From now on no row of a shard is returned before the shard's sha256 matched the
        manifest: a background thread hashes the shards, in the order in which ``indices``
        (the dataset indices in the order a run will read them; default: shard order) first
        touch them, and a read that needs a shard not yet verified hashes it first. A damaged
        shard raises :class:`DatasetError` naming it, at the first read after it was found.
        ``record``: a run's :class:`~selfflow.data.verify.ShardRecord`, whose unchanged
        shards count as verified and which learns the shards hashed here."""
        from selfflow.data.verify import ShardVerifier

        self.stop_verifying()
        self._verifier = ShardVerifier(self, self._first_touch(indices), record)
        return self._verifier

    def stop_verifying(self) -> None:
        """Stop the background hashing (what was verified stays verified for this object)."""
        if self._verifier is not None:
            self._verifier.close()

    def _first_touch(self, indices: Any) -> list[int]:
        """Shard ids in the order ``indices`` first reach them, then the unreached ones."""
        if indices is None:
            return list(range(self.num_shards))
        shard_ids = np.searchsorted(self._starts, np.asarray(indices), side="right") - 1
        found, first = np.unique(shard_ids, return_index=True)
        reached = [int(k) for k in found[np.argsort(first)]]
        return reached + sorted(set(range(self.num_shards)) - set(reached))

    def _read_labels(self, count: int) -> np.ndarray:
        path = self.root / LABELS_NAME
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path} is missing or unreadable ({error})") from error
        if labels.shape != (count,) or labels.dtype != np.int64:
            raise DatasetError(
                f"{path} holds {labels.dtype} {labels.shape}; expected int64 ({count},)"
            )
        if labels_sha256(labels) != self.manifest["labels_sha256"]:
            raise DatasetError(f"{path} is damaged: its sha256 differs from the manifest's")
        if count and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DatasetError(f"{path} holds labels outside 0..{self.num_classes - 1}")
        return labels

    def _shard(self, shard_id: int) -> np.ndarray:
        """The memory map of one shard array, opened (and its header checked) on first use;
        while verifying, only once its sha256 matched the manifest."""
        if self._verifier is not None and shard_id not in self._verifier.good:
            self._verifier.require(shard_id)
        array = self._maps.get(shard_id)
        if array is not None:
            self._maps.move_to_end(shard_id)
            return array
        path = self._paths[shard_id]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetError(f"shard {path} is missing or unreadable ({error})") from error
        expected = self._expected_shape(shard_id)
        if array.shape != expected or array.dtype != np.dtype(self.dtype):
            raise DatasetError(
                f"shard {path} holds {array.dtype} {array.shape}; the manifest says "
                f"{self.dtype} {expected}"
            )
        self._maps[shard_id] = array
        while len(self._maps) > MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int; got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        shard_id = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = np.asarray(self._shard(shard_id)[index - self._starts[shard_id]], dtype=np.float32)
        mean = torch.from_numpy(row[0].copy())
        std = torch.from_numpy(row[1].copy()) if self.has_std else torch.zeros_like(mean)
        return mean, std, int(self.labels[index])

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(means, stds or None, labels)`` for any 1-D array of indices, in their order.

        Indices are grouped by shard; each shard's rows are read in ascending order (one
        fancy-index on the memory map, which the page cache and the disk serve best) and
        written straight to the positions asked for. Repeated indices are allowed.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D integer array; got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"index {bad} is out of range for {len(self)} images")
        shard_ids = np.searchsorted(self._starts, idx, side="right") - 1
        if self._verifier is not None:
            self._verifier.check()  # a damaged shard found in the background stops the reads
            if not self._verifier.done:  # this batch's unverified shards, hashed side by side
                self._verifier.require_all(np.unique(shard_ids))
        n = idx.shape[0]
        means = np.empty((n, *self.latent_shape), dtype=np.float32)
        stds = np.empty_like(means) if self.has_std else None
        order = np.argsort(shard_ids, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_ids[order])) + 1
        for group in np.split(order, bounds) if n else []:
            shard_id = int(shard_ids[group[0]])
            local = idx[group] - self._starts[shard_id]
            ascending = np.argsort(local, kind="stable")
            rows = self._shard(shard_id)[local[ascending]]  # one read, in file order
            targets = group[ascending]
            means[targets] = rows[:, 0]
            if stds is not None:
                stds[targets] = rows[:, 1]
        labels = torch.from_numpy(self.labels[idx].copy())
        return (
            torch.from_numpy(means),
            None if stds is None else torch.from_numpy(stds),
            labels,
        )

    def verify(self, progress: bool = False) -> None:
        """Re-hash every shard against the manifest's sha256 (reads the whole dataset once);
        raises :class:`DatasetError` naming every shard that differs."""
        from selfflow.data.verify import damaged_error, verify_all

        problems = verify_all(self, progress=progress)
        if problems:
            raise damaged_error(self, problems)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are re-opened in the process that unpickles (a data-loader worker);
        # pickling them would copy the shards' contents.
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        state["_verifier"] = None  # a thread does not travel; the receiver may start its own
        return state

    def __repr__(self) -> str:
        return (
            f"LatentDataset({str(self.root)!r}: {len(self)} images {self.latent_shape} "
            f"{self.dtype}, {self.num_classes} classes, identity {self.identity})"
        )
