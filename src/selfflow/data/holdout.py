"""Held-out images: ``selfflow prepare --val-per-class N`` writes a second dataset, never trained on.

The validation loss (``selfflow train --val-data``) needs images the model never saw. With
``--val-per-class N``, ``selfflow prepare IMAGE_DIR OUT_DIR`` holds out N images of every class
into a second dataset **beside** the first, ``OUT_DIR-val`` (a sibling folder, so that each
folder stays one plain dataset that ``LatentDataset`` opens), and encodes the rest into
``OUT_DIR``; the two are disjoint by construction.

**Which images.** Within each class, the N files whose ``sha256("selfflow/holdout/" + CLASS/FILE)``
(the path below ``IMAGE_DIR``) is smallest. The choice depends on each file's own path only:
not on the listing order, the process count, or the other classes, and adding images to a
class moves at most as many held-out images as were added. Both manifests record it under
``holdout``: the rule, N, the two folders, and the held-out files by name.

A class needs more than N images (after ``--limit``), or it would keep none for training.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.base.errors import ConfigurationError
from selfflow.data.images import SourceList, listing

VAL_SUFFIX = "-val"
RULE = "per class, the N files with the smallest sha256('selfflow/holdout/' + CLASS/FILE)"


def val_dir(out_dir: str | Path) -> Path:
    """Where the held-out dataset of ``OUT_DIR`` goes: the sibling ``OUT_DIR-val``."""
    out = Path(out_dir)
    return out.with_name(out.name + VAL_SUFFIX)


def holdout_key(relative_path: str) -> str:
    """The ranking key of a file, ``CLASS/FILE`` below ``IMAGE_DIR`` (see the module doc)."""
    return hashlib.sha256(f"selfflow/holdout/{relative_path}".encode()).hexdigest()


def held_out_indices(source: SourceList, per_class: int) -> np.ndarray:
    """Indices into ``source.files`` of the held-out images, in dataset order."""
    chosen: list[int] = []
    short = []
    for label, name in enumerate(source.class_names):
        members = np.flatnonzero(source.labels == label)
        if len(members) <= per_class:
            short.append(f"{name} ({len(members)})")
            continue
        ranked = sorted(members.tolist(), key=lambda i: holdout_key(source.files[i]))
        chosen += ranked[:per_class]
    if short:
        raise ConfigurationError(
            f"--val-per-class {per_class} needs more than {per_class} images in every class, "
            f"to keep some for training; these have fewer: {listing(short)}"
        )
    return np.asarray(sorted(chosen), dtype=np.int64)


def split(
    source: SourceList, per_class: int | None, part: str, out_dir: Path
) -> tuple[SourceList, Any]:
    """The images of ``part`` (``"all"``, ``"train"`` or ``"val"``, written to ``out_dir``) and
    the ``holdout`` record for its manifest (None for ``"all"``)."""
    if part == "all" or not per_class:
        return source, None
    held = held_out_indices(source, per_class)
    keep = np.ones(len(source.files), dtype=bool)
    keep[held] = False
    chosen = held if part == "val" else np.flatnonzero(keep)
    subset = replace(
        source,
        files=[source.files[i] for i in chosen],
        labels=source.labels[chosen],
        not_images=source.not_images if part == "train" else [],
    )
    out = Path(out_dir).resolve()
    train = out if part == "train" else out.with_name(out.name.removesuffix(VAL_SUFFIX))
    return subset, {
        "part": part,
        "train": str(train),
        "val": str(val_dir(train)),
        "per_class": per_class,
        "rule": RULE,
        "held_out_files": [source.files[i] for i in held],
        "source_files_digest": source.digest,
    }


def parts(config: Any) -> list[tuple[str, Any]]:
    """``(part, config)`` of each dataset a ``selfflow prepare`` run writes: the whole list, or
    the training part in ``OUT_DIR`` then the held-out part in ``OUT_DIR-val``."""
    if not config.val_per_class:
        return [("all", config)]
    val = replace(config, out_dir=val_dir(config.out_dir))
    val.validate()  # the second folder is checked like the first, before any work
    return [("train", config), ("val", val)]
