"""Generated ImageFolder trees for the prepare tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cow")


def write_tree(root: Path, per_class: int = 8, seed: int = 0, classes=CLASSES) -> Path:
    """``root/<class>/<image>``: JPEGs and PNGs of many sizes and modes (some smaller than 16
    pixels, one greyscale, one CMYK, one palette), written in shuffled order so that sorting
    matters."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in rng.permutation(per_class):
            height, width = (int(v) for v in rng.integers(9, 70, 2))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            kind = (i + c) % 4
            if kind == 1:
                image.convert("L").save(folder / f"img_{i:03d}.png")
            elif kind == 2 and i % 2:
                image.convert("CMYK").save(folder / f"img_{i:03d}.jpg", quality=90)
            elif kind == 3:
                image.convert("P").save(folder / f"img_{i:03d}.png")
            else:
                image.save(folder / f"img_{i:03d}.JPEG", quality=90)
    return root


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }
