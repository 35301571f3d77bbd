"""Pictures for people: image grids and PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` uint8 images into one ``(rows·H, columns·W, 3)`` picture.

    Empty cells and the padding between images are white, so class grids read like a figure.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, 3); got {images.dtype} {images.shape}"
        )
    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * height + (rows - 1) * padding, columns * width + (columns - 1) * padding, 3),
        255,
        dtype=np.uint8,
    )
    for n, image in enumerate(images):
        r, c = divmod(n, columns)
        top, left = r * (height + padding), c * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one ``(H, W, 3)`` uint8 image as PNG, atomically (temporary name, then rename)."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_grid(images: np.ndarray, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write ``images`` as one grid PNG."""
    return save_png(image_grid(images, columns), path)
