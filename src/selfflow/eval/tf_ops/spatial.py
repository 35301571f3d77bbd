"""Windows over the image: convolution, pooling and bilinear resizing, in NHWC.

Convolutions and pools look at an NHWC tensor through a ``permute`` view, which is exactly
PyTorch's channels-last memory format, so no copies are made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.eval.tf_ops.base import (
    OpContext,
    OpFn,
    check_nhwc,
    paddings,
    register,
    static_ints,
    to_ints,
    window_attrs,
)

# ----------------------------------------------------------------------------------------------
# Convolution and pooling


@register("Conv2D")
def _conv2d(ctx: OpContext) -> OpFn:
    check_nhwc(ctx)
    stride = window_attrs(ctx, "strides")
    dilation = window_attrs(ctx, "dilations") if "dilations" in ctx.node.attr else (1, 1)  # type: ignore[attr-defined]
    padding = ctx.required_attr("padding")
    filt = ctx.constant(1)
    weight = None
    if filt is not None:  # HWIO -> OIHW once, on the device
        if filt.ndim != 4:
            raise ctx.fail(f"filter of shape {list(filt.shape)} is not 4-D (HWIO)")
        weight = torch.from_numpy(np.ascontiguousarray(filt.transpose(3, 2, 0, 1))).to(ctx.device)

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        w = weight if weight is not None else inputs[1].permute(3, 2, 0, 1)
        kernel = (w.shape[2], w.shape[3])
        top, bottom, left, right = paddings(
            ctx, padding, x.shape[1], x.shape[2], kernel, stride, dilation
        )
        xc = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels-last)
        if top == bottom and left == right:
            y = F.conv2d(xc, w, stride=stride, padding=(top, left), dilation=dilation)
        else:
            xc = F.pad(xc, (left, right, top, bottom))
            y = F.conv2d(xc, w, stride=stride, dilation=dilation)
        return [y.permute(0, 2, 3, 1)]

    return run


@register("MaxPool")
def _max_pool(ctx: OpContext) -> OpFn:
    check_nhwc(ctx)
    kernel = window_attrs(ctx, "ksize")
    stride = window_attrs(ctx, "strides")
    padding = ctx.required_attr("padding")

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        top, bottom, left, right = paddings(ctx, padding, x.shape[1], x.shape[2], kernel, stride)
        xc = x.permute(0, 3, 1, 2)
        if top or bottom or left or right:  # padding never wins a max
            xc = F.pad(xc, (left, right, top, bottom), value=float("-inf"))
        return [F.max_pool2d(xc, kernel, stride).permute(0, 2, 3, 1)]

    return run


@register("AvgPool")
def _avg_pool(ctx: OpContext) -> OpFn:
    check_nhwc(ctx)
    kernel = window_attrs(ctx, "ksize")
    stride = window_attrs(ctx, "strides")
    padding = ctx.required_attr("padding")
    counts_cache: dict[tuple, torch.Tensor] = {}

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        top, bottom, left, right = paddings(ctx, padding, x.shape[1], x.shape[2], kernel, stride)
        xc = x.permute(0, 3, 1, 2)
        if not (top or bottom or left or right):
            return [F.avg_pool2d(xc, kernel, stride).permute(0, 2, 3, 1)]
        # SAME: TF divides each window's sum by the number of real (unpadded) inputs in it.
        pad = (left, right, top, bottom)
        sums = F.avg_pool2d(F.pad(xc, pad), kernel, stride, divisor_override=1)
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        if key not in counts_cache:
            ones = torch.ones((1, 1, x.shape[1], x.shape[2]), device=x.device, dtype=x.dtype)
            counts_cache[key] = F.avg_pool2d(F.pad(ones, pad), kernel, stride, divisor_override=1)
        return [(sums / counts_cache[key]).permute(0, 2, 3, 1)]

    return run


# ----------------------------------------------------------------------------------------------
# Resize


def resize_weights(
    in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lower, upper) and lerp weights of TF's bilinear resize, in float32.

    TF1 default (align_corners and half_pixel_centers both false): source = dst * in/out, so the
    image is sampled from its top-left corner, unlike PyTorch's ``interpolate``.
    """
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    index = np.arange(out_size, dtype=np.float32)
    if half_pixel_centers:
        source = (index + np.float32(0.5)) * scale - np.float32(0.5)
    else:
        source = index * scale
    source = source.astype(np.float32)
    floor = np.floor(source)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)
    lerp = (source - floor).astype(np.float32)
    return lower, upper, lerp


@register("ResizeBilinear")
def _resize_bilinear(ctx: OpContext) -> OpFn:
    align_corners = bool(ctx.attr("align_corners", False))
    half_pixel = bool(ctx.attr("half_pixel_centers", False))
    if align_corners and half_pixel:
        raise ctx.fail("align_corners and half_pixel_centers cannot both be true")
    static = static_ints(ctx, 1)
    cache: dict[tuple, tuple] = {}

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0].to(torch.float32)
        out_h, out_w = static if static is not None else to_ints(inputs[1])
        key = (x.shape[1], x.shape[2], out_h, out_w, x.device)
        if key not in cache:
            ys = resize_weights(x.shape[1], out_h, align_corners, half_pixel)
            xs = resize_weights(x.shape[2], out_w, align_corners, half_pixel)
            cache[key] = tuple(torch.from_numpy(a).to(x.device) for a in (*ys, *xs))
        y_lo, y_hi, y_lerp, x_lo, x_hi, x_lerp = cache[key]
        x_lerp = x_lerp[:, None]

        def horizontal(rows: torch.Tensor) -> torch.Tensor:
            # (N * out_h, W, C): index_select on 4-D tensors falls off a speed cliff on CPUs.
            flat = rows.reshape(-1, rows.shape[2], rows.shape[3])
            left, right = flat.index_select(1, x_lo), flat.index_select(1, x_hi)
            out = right.sub_(left).mul_(x_lerp).add_(left)  # left + (right - left) * lerp
            return out.reshape(rows.shape[0], rows.shape[1], -1, rows.shape[3])

        # Same operations, in the same order, as TF's compute_lerp: horizontal, then vertical.
        top = horizontal(x.index_select(1, y_lo))
        bottom = horizontal(x.index_select(1, y_hi))
        return [bottom.sub_(top).mul_(y_lerp[:, None, None]).add_(top)]

    return run
