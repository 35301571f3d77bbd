"""Pictures for people: image grids and PNG files."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from selfflow.base.errors import ConfigurationError
from selfflow.base.files import replaced_atomically

# File formats by extension, as PIL names them; anything else is refused before any work.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_JPEG_QUALITY = 95
# Cells of captioned grids widen to their longest caption up to this many pixels (about 26
# characters of PIL's default font): a 16-pixel image would otherwise show "0 b" for "0 boat".
MAX_CAPTION_WIDTH = 160


def image_grid(
    images: np.ndarray,
    columns: int | None = None,
    padding: int = 2,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` uint8 images into one ``(rows·H, columns·W, 3)`` picture.

    Empty cells and the padding between images are white, so class grids read like a figure.
    With ``captions`` (one per image) each cell gets a white band below its image with the
    text in black (PIL's default font); cells are widened (white on the right of each image)
    to fit the longest caption up to ``MAX_CAPTION_WIDTH`` pixels, so small images keep
    readable names, and longer captions are cut to the cell's width. The images stay untouched.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, 3); got {images.dtype} {images.shape}"
        )
    count, height, width, _ = images.shape
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1; got {columns}")
    if captions is not None and len(captions) != count:
        raise ValueError(f"got {len(captions)} captions for {count} images")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    font = _caption_font() if captions is not None else None
    band = _caption_height(font) if font is not None else 0
    cell = height + band
    cell_width = width
    if font is not None:
        longest = max(int(math.ceil(font.getlength(str(text)))) for text in captions) + 2
        cell_width = max(width, min(longest, MAX_CAPTION_WIDTH))
    grid = np.full(
        (rows * cell + (rows - 1) * padding, columns * cell_width + (columns - 1) * padding, 3),
        255,
        dtype=np.uint8,
    )
    for n, image in enumerate(images):
        r, c = divmod(n, columns)
        top, left = r * (cell + padding), c * (cell_width + padding)
        grid[top : top + height, left : left + width] = image
    if captions is not None:
        grid = _draw_captions(grid, captions, columns, (cell, cell_width), height, padding, font)
    return grid


def _caption_font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _caption_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom) + 4


def _draw_captions(grid, captions, columns, cell, image_height, padding, font) -> np.ndarray:
    from PIL import Image, ImageDraw

    picture = Image.fromarray(grid)
    draw = ImageDraw.Draw(picture)
    for n, text in enumerate(captions):
        r, c = divmod(n, columns)
        top = r * (cell[0] + padding) + image_height + 2
        left = c * (cell[1] + padding) + 1
        text = str(text)
        while text and draw.textlength(text, font=font) > cell[1] - 2:
            text = text[:-1]  # cut to the cell's width
        draw.text((left, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def image_format(path: str | os.PathLike) -> str:
    """PIL's format name for ``path``'s extension; other extensions are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ConfigurationError(
            f"{path}: cannot tell the image format from the extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(IMAGE_FORMATS)}"
        )
    name = IMAGE_FORMATS[suffix]
    if name == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise ConfigurationError(f"{path}: this Pillow was built without WebP support")
    return name


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one ``(H, W, 3)`` uint8 image in the format its extension names, atomically:
    PNG, JPEG (quality 95) or WebP (lossless)."""
    name = image_format(path)
    options = {"JPEG": {"quality": _JPEG_QUALITY}, "WEBP": {"lossless": True}}.get(name, {})
    return _save_atomic(image, Path(path), name, options)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one ``(H, W, 3)`` uint8 image as PNG, atomically (temporary name, then rename)."""
    return _save_atomic(image, Path(path), "PNG", {})


def _save_atomic(image: np.ndarray, path: Path, name: str, options: dict) -> Path:
    from PIL import Image

    with replaced_atomically(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format=name, **options)
    return path


def save_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    columns: int | None = None,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write ``images`` as one grid picture, in the format the extension names."""
    return save_image(image_grid(images, columns, captions=captions), path)
