"""adm_center_crop against a second implementation written from the algorithm's description.

The reference below re-derives the crop without calling PIL's resize: ADM's loop of BOX
halvings, one BICUBIC resize with ``round(side · size / short side)``, then the central square,
with each resize computed as Pillow defines its 8-bit convolution (separable, horizontal pass
then vertical, each rounded to uint8; weights from the filter evaluated at pixel centres, support
scaled by the reduction factor, normalised, then rounded to 22-bit fixed point). Float64 numpy
throughout, so a different filter, a different size rounding, a wrong loop condition or crop
offset shows as differing bytes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from selfflow.data import adm_center_crop

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images: 32 - 8 - 2


def box_filter(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def bicubic_filter(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


FILTERS = {"box": (box_filter, 0.5), "bicubic": (bicubic_filter, 2.0)}


def weight_matrix(in_size: int, out_size: int, name: str) -> np.ndarray:
    """``(out_size, in_size)`` integer weights: row ``o`` says how input pixels make output ``o``."""
    function, support = FILTERS[name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    for o in range(out_size):
        centre = (o + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = [function((x - centre + 0.5) / filterscale) for x in range(first, last)]
        total = 0.0
        for tap in taps:
            total += tap
        for offset, tap in enumerate(taps):
            value = (tap / total if total else tap) * (1 << PRECISION_BITS)
            weights[o, first + offset] = math.trunc(value - 0.5 if value < 0 else value + 0.5)
    return weights


def resample_rows(pixels: np.ndarray, out_width: int, name: str) -> np.ndarray:
    """One separable pass along axis 1 of ``(H, W, 3)`` uint8, rounded back to uint8."""
    weights = weight_matrix(pixels.shape[1], out_width, name)
    acc = np.einsum("ow,hwc->hoc", weights, pixels.astype(np.int64)) + (1 << (PRECISION_BITS - 1))
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def reference_resize(pixels: np.ndarray, width: int, height: int, name: str) -> np.ndarray:
    if pixels.shape[1] != width:
        pixels = resample_rows(pixels, width, name)
    if pixels.shape[0] != height:
        pixels = resample_rows(pixels.transpose(1, 0, 2), height, name).transpose(1, 0, 2)
    return pixels


def reference_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    halvings = 0
    while min(height, width) >= 2 * size:  # ADM: halve while the short side is >= 2·size
        height, width = height // 2, width // 2
        pixels = reference_resize(pixels, width, height, "box")
        halvings += 1
    factor = size / min(height, width)
    height, width = round(height * factor), round(width * factor)
    pixels = reference_resize(pixels, width, height, "bicubic")
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top : top + size, left : left + size]


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """Noise plus smooth gradients: every pixel matters, and resampling has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 256, (height, width, 3))
    return ((smooth + noise) / 2).astype(np.uint8)


SHAPES = [  # (height, width, size)
    (32, 32, 16),  # exactly 2x: one halving, then no resize
    (33, 32, 16),  # odd height
    (40, 64, 16),  # landscape
    (64, 40, 16),  # portrait
    (70, 21, 16),  # tall and thin
    (10, 13, 16),  # smaller than the crop: upscaled
    (5, 30, 16),  # much smaller short side
    (31, 31, 16),  # just under 2x: no halving
    (65, 97, 16),  # 4x: two halvings of odd sides
    (131, 67, 32),  # odd sizes, two halvings
    (2, 3, 3),  # short side 2 → width round(4.5) = 4 (round half to even)
    (200, 300, 24),  # several halvings, then a downscale
    (23, 23, 7),  # odd crop size
    (16, 16, 16),  # already the size
]


@pytest.mark.parametrize("height,width,size", SHAPES)
def test_rgb_crops_equal_the_reference(height, width, size):
    pixels = textured(height, width, seed=height * 1000 + width)
    got = adm_center_crop(Image.fromarray(pixels), size)
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, reference_crop(pixels, size))


def test_the_reference_is_not_a_plain_resize():
    """The BOX halvings matter: one bicubic resize from the original gives other bytes."""
    pixels = textured(131, 67, seed=3)
    once = np.asarray(Image.fromarray(pixels).resize((32, round(131 * 32 / 67)), Image.BICUBIC))
    top = (once.shape[0] - 32) // 2
    assert not np.array_equal(reference_crop(pixels, 32), once[top : top + 32])


def test_width_pass_first_is_what_the_reference_requires():
    """For a tall image the two pass orders give different bytes (Pillow 13 switched to the
    vertical pass first for such images); the crop keeps ADM's width-first order."""
    pixels = textured(70, 21, seed=70021)
    height_first = resample_rows(pixels.transpose(1, 0, 2), 53, "bicubic").transpose(1, 0, 2)
    height_first = resample_rows(height_first, 16, "bicubic")
    width_first = reference_resize(pixels, 16, 53, "bicubic")
    assert not np.array_equal(height_first, width_first)
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(pixels), 16), width_first[18:34])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_modes_are_cropped_as_rgb(mode):
    rgb = textured(45, 37, seed=9)
    if mode == "L":
        image = Image.fromarray(rgb[..., 0])
        as_rgb = np.repeat(rgb[..., :1], 3, axis=-1)
    elif mode == "P":
        palette = textured(1, 256, seed=4)[0]
        indices = rgb[..., 1]
        image = Image.fromarray(indices, mode="L")
        image = image.convert("P")
        image.putpalette(palette.tobytes())
        as_rgb = palette[indices]
    elif mode == "RGBA":
        alpha = textured(45, 37, seed=5)[..., :1]
        image = Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
        as_rgb = rgb  # alpha dropped, colours kept
    elif mode == "CMYK":
        image = Image.fromarray(rgb).convert("CMYK")
        as_rgb = np.asarray(image.convert("RGB"))  # Pillow's own CMYK → RGB formula
    else:
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 3)
        as_rgb = np.asarray(image.convert("RGB"))
    assert image.mode == mode
    np.testing.assert_array_equal(adm_center_crop(image, 16), reference_crop(as_rgb, 16))


@pytest.mark.parametrize("size", [0, -3, 2.0, True])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="positive integer"):
        adm_center_crop(Image.new("RGB", (8, 8)), size)
