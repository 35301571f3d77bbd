"""ADM's centre crop (guided-diffusion's ``center_crop_arr``), the crop Self-Flow's data uses.

While the short side is at least twice the target, the image is halved with a BOX filter
(each side integer-divided by 2); then one BICUBIC resize brings the short side to the target
(each side ``round(side · size / short side)``); then the central ``size × size`` square is cut,
its corner at ``((h − size) // 2, (w − size) // 2)``. The repeated BOX halving is what makes it
differ from a single resize (it averages away aliasing); matching it byte for byte matters
because the released model's statistics were fit to these bytes.

**Pillow 13 changed those bytes.** Pillow resizes in two separable passes, each rounded to
8 bits. Up to Pillow 12 the horizontal pass always ran first; since Pillow 13 the vertical pass
runs first when the height shrinks much more than the width (tall images), which moves some
pixels by one level. ADM's data was made with the old order, so each resize here is done as two
explicit one-axis resizes, width first: the same bytes on every Pillow version.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB: ADM's centre crop of ``image`` (any mode, any size).

    Images in other modes (CMYK, greyscale, palette, RGBA) are converted to RGB first, as
    ImageFolder loaders do before ADM's crop sees them. An image smaller than ``size`` is
    upscaled by the bicubic step.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"crop size must be a positive integer; got {size!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = resize_width_first(image, (image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.size)
    target = (round(image.width * scale), round(image.height * scale))
    image = resize_width_first(image, target, Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def resize_width_first(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """``image.resize(size, resample)`` with the horizontal pass first, on any Pillow version.

    A resize that keeps one side runs only the other side's pass, so two one-axis resizes are
    exactly Pillow's two passes, in the order that Pillow used before version 13.
    """
    width, height = size
    if image.width != width:
        image = image.resize((width, image.height), resample=resample)
    if image.height != height:
        image = image.resize((width, height), resample=resample)
    return image
