"""The op registry of the GraphDef executor, and the rules every op family shares.

A *builder* reads a node's attributes and constant inputs once and returns a small function of
the runtime inputs; :func:`register` files it under the TensorFlow op types it implements.
TensorFlow's padding rules (``SAME``/``VALID``/explicit) live here, as both the normalisation
and the window ops need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.eval.graphdef import TFGraph, get_attr

OpFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class OpContext:
    """What a builder may look at: the node, the graph (for constants) and the device."""

    node: object  # NodeDef
    graph: TFGraph
    device: torch.device
    inplace: bool = False  # input 0 is dead after this node and owns its memory: reuse it

    @property
    def name(self) -> str:
        return self.node.name  # type: ignore[attr-defined]

    def attr(self, key: str, default=None):
        return get_attr(self.node, key, default)  # type: ignore[arg-type]

    def required_attr(self, key: str):
        return get_attr(self.node, key)  # type: ignore[arg-type]

    @property
    def inputs(self) -> list[str]:
        return [i for i in self.node.input if not i.startswith("^")]  # type: ignore[attr-defined]

    def constant(self, index: int) -> np.ndarray | None:
        """Input ``index`` as a numpy array when it is a Const, else ``None``."""
        return self.graph.constant(self.inputs[index])

    def fail(self, what: str) -> ConfigurationError:
        return ConfigurationError(f"node {self.name!r} ({self.node.op}): {what}")  # type: ignore[attr-defined]


BUILDERS: dict[str, Callable[[OpContext], OpFn]] = {}


def register(*op_types: str):
    """Decorator: file a builder under the op types it implements."""

    def wrap(builder: Callable[[OpContext], OpFn]) -> Callable[[OpContext], OpFn]:
        for op_type in op_types:
            BUILDERS[op_type] = builder
        return builder

    return wrap


def supported_ops() -> list[str]:
    """The op types the executor can run, sorted."""
    return sorted(BUILDERS)


TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}


def to_ints(value: np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return [int(v) for v in np.asarray(value).reshape(-1)]


def static_ints(ctx: OpContext, index: int) -> list[int] | None:
    value = ctx.constant(index)
    return None if value is None else to_ints(value)


def align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put two operands on one device (shape constants live on the CPU)."""
    if a.device != b.device:
        if a.dim() == 0 or a.numel() == 1:
            a = a.to(b.device)
        else:
            b = b.to(a.device)
    return a, b


# ----------------------------------------------------------------------------------------------
# Padding rules


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding: output ceil(size / stride), extra padding at the end."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def window_attrs(ctx: OpContext, key: str) -> tuple[int, int]:
    values = ctx.required_attr(key)
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise ctx.fail(f"{key} {list(values)} must be [1, h, w, 1] (NHWC, no batch/channel stride)")
    return int(values[1]), int(values[2])


def check_nhwc(ctx: OpContext) -> None:
    fmt = ctx.attr("data_format", "NHWC")
    if fmt != "NHWC":
        raise ctx.fail(f"data_format {fmt} is not supported (only NHWC)")


def paddings(
    ctx: OpContext,
    padding: str,
    height: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of one spatial map."""
    if padding == "VALID":
        return 0, 0, 0, 0
    if padding == "SAME":
        top, bottom = same_padding(height, kernel[0], stride[0], dilation[0])
        left, right = same_padding(width, kernel[1], stride[1], dilation[1])
        return top, bottom, left, right
    if padding == "EXPLICIT":
        pads = [int(p) for p in ctx.attr("explicit_paddings", [])]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 6, 7)):
            raise ctx.fail(f"explicit_paddings {pads} must pad only H and W")
        return pads[2], pads[3], pads[4], pads[5]
    raise ctx.fail(f"padding {padding!r} is not SAME, VALID or EXPLICIT")
