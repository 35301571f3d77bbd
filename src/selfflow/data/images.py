"""The source side of ``selfflow prepare``: list an ImageFolder tree, decode and crop images.

**Order.** Classes are the sorted names of ``IMAGE_DIR``'s sub-folders (label ``k`` is the
``k``-th); within a class, images are taken in sorted order of their path below the class
folder; the dataset's index runs class by class. This is ImageFolder's order, ADM's and DiT's,
and so the released model's label order for ImageNet.

**What counts as an image** is decided by the file extension, before any work starts: hidden
files (``.DS_Store``) are ignored, any other file is reported. Whether an image decodes is only
known when it is read, in the decoding workers (:class:`CroppedImages`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfflow.base.classes import imagenet_wnids
from selfflow.base.errors import ConfigurationError, DatasetError
from selfflow.data.crop import adm_center_crop

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".png",
    ".ppm",
    ".pgm",
    ".pbm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
WNID_PATTERN = re.compile(r"n\d{8}")
SHOWN = 8  # names listed in an error before "and N more"


def listing(names: list[str]) -> str:
    """``a, b, c and N more``: the first few names of a long list, for a message."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


@dataclass
class SourceList:
    """The images to prepare, in dataset order, with their labels."""

    root: Path
    class_names: list[str]
    files: list[str]  # paths relative to root, "class/name.JPEG"
    labels: np.ndarray  # int64, one per file
    not_images: list[str] = field(default_factory=list)  # relative paths of other files

    @property
    def digest(self) -> str:
        """sha256 of the (label, path) list: names and order, not file contents (hashing 140 GB
        of JPEGs would take longer than the encoding)."""
        digest = hashlib.sha256()
        for label, name in zip(self.labels.tolist(), self.files, strict=True):
            digest.update(f"{label}\t{name}\n".encode())
        return digest.hexdigest()


def _class_files(folder: Path) -> tuple[list[str], list[str]]:
    """(images, other files) below one class folder, as sorted paths relative to it."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(folder)
        for name in filenames:
            if name.startswith("."):
                continue
            relative = (base / name).as_posix()
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(relative)
    return sorted(images), sorted(others)


def _check_imagenet(names: list[str], classes: int | None) -> None:
    """A tree of WordNet-id folders must hold the standard ImageNet classes, so that its labels
    are the released model's labels: extra ids are refused, and so are missing ones (with
    ``--classes K``, the first K of the standard 1000)."""
    standard = imagenet_wnids()
    extra = sorted(set(names) - set(standard))
    if extra:
        raise DatasetError(
            f"the class folders look like ImageNet WordNet ids, but {len(extra)} are not among "
            f"ImageNet's 1000 classes: {listing(extra)}; remove them (labels would not match "
            f"the released model's)"
        )
    required = standard[:classes] if classes else standard
    missing = sorted(set(required) - set(names))
    if missing:
        scope = f"the first {classes}" if classes else "the 1000"
        raise DatasetError(
            f"the class folders are ImageNet WordNet ids, but {len(missing)} of {scope} "
            f"ImageNet classes are missing: {listing(missing)}; without them every later "
            f"label would shift (use --classes K for the first K classes only)"
        )


def list_image_folder(
    root: str | os.PathLike, *, classes: int | None = None, limit: int | None = None
) -> SourceList:
    """List ``root/<class>/<image>`` in dataset order; ``classes``: the first K classes only;
    ``limit``: the first N images of each class."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigurationError(
            f"IMAGE_DIR {root} {'is not a folder' if root.exists() else 'does not exist'}: "
            f"expected IMAGE_DIR/<class>/<image> (ImageNet's train/n01440764/...JPEG layout)"
        )
    entries = sorted(e.name for e in os.scandir(root) if not e.name.startswith("."))
    names = [name for name in entries if (root / name).is_dir()]
    if not names:
        loose = len(entries)
        raise DatasetError(
            f"IMAGE_DIR {root} has no class folders (it holds {loose} other entries): expected "
            f"IMAGE_DIR/<class>/<image>, one sub-folder per class"
        )
    if classes is not None and classes > len(names):
        raise ConfigurationError(f"--classes {classes}: {root} has only {len(names)} class folders")
    if all(WNID_PATTERN.fullmatch(name) for name in names):
        _check_imagenet(names, classes)
    names = names[:classes] if classes else names
    files: list[str] = []
    labels: list[int] = []
    not_images: list[str] = []
    for label, name in enumerate(names):
        images, others = _class_files(root / name)
        not_images += [f"{name}/{other}" for other in others]
        if not images:
            raise DatasetError(
                f"class folder {root / name} holds no images ({len(others)} other files); "
                f"every class needs at least one image (remove the folder to drop the class)"
            )
        images = images[:limit] if limit else images
        files += [f"{name}/{image}" for image in images]
        labels += [label] * len(images)
    return SourceList(root, names, files, np.asarray(labels, dtype=np.int64), not_images)


@dataclass
class Decoded:
    """One image after decoding and cropping, or the reason it could not be read."""

    index: int
    pixels: np.ndarray | None
    error: str | None = None
    upscaled: bool = False


class CroppedImages:
    """Map-style dataset for a torch DataLoader: index → :class:`Decoded` (runs in workers).

    Errors are returned, not raised, so that the encoding process decides (stop naming the
    file, or skip it under ``--skip-bad-images``) and a worker never dies on a bad JPEG.
    """

    def __init__(self, root: Path, files: list[str], image_size: int) -> None:
        self.root = Path(root)
        self.files = files
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Decoded:
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image.load()  # decodes fully: a truncated file fails here, not later
                upscaled = min(image.size) < self.image_size
                pixels = adm_center_crop(image, self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            reason = f"{type(error).__name__}: {error}"
            return Decoded(index, None, reason)
        return Decoded(index, pixels, None, upscaled)


def collate(batch: list[Any]) -> list[Any]:
    """Keep the batch a list (pickled back from the workers as it is)."""
    return batch


PARENT_POLL_SECONDS = 0.2


def end_with_parent(interval: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """In a decoding worker: end the process at once when its parent (the encoding process)
    is gone, e.g. killed by SIGKILL or the out-of-memory killer.

    torch's own check looks every 5 s, and then the worker still cannot exit: its result
    queue's feeder thread is blocked writing decoded images into a pipe that nobody reads, and
    Python's exit waits for that thread, so the workers lived on indefinitely. A daemon thread
    that polls ``os.getppid()`` (which changes when the parent dies and the worker is handed to
    init or a subreaper) and leaves with ``os._exit`` (no thread is joined) works on every
    POSIX system and with any start method; Linux's ``prctl(PR_SET_PDEATHSIG)`` would need
    ctypes, exists nowhere else, and fires when the parent *thread* that started the worker
    ends, not the process. The cost is one wake-up per ``interval`` per worker.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="end-with-parent", daemon=True)
    thread.start()
    return thread
