"""Execute GraphDef nodes in PyTorch with TensorFlow's semantics.

Tensors keep TensorFlow's NHWC layout at the graph level. Convolutions and pools look at an
NHWC tensor through a ``permute`` view, which is exactly PyTorch's channels-last memory format,
so no copies are made and cuDNN/oneDNN run their NHWC kernels.

Each supported op type has a *builder*: it reads the node's attributes and constant inputs once
(filters are transposed to PyTorch's layout ahead of time) and returns a small function of the
runtime inputs. An op type without a builder stops graph construction with its node's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.errors import ConfigurationError, EvaluationError
from selfflow.eval.graphdef import TFGraph, get_attr, numpy_dtype, parse_input, tensor_name

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


_BUILDERS: dict[str, Callable[[OpContext], OpFn]] = {}


def register(*op_types: str):
    def wrap(builder: Callable[[OpContext], OpFn]) -> Callable[[OpContext], OpFn]:
        for op_type in op_types:
            _BUILDERS[op_type] = builder
        return builder

    return wrap


def supported_ops() -> list[str]:
    return sorted(_BUILDERS)


_TORCH_DTYPES = {
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


def _to_ints(value: np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _static_ints(ctx: OpContext, index: int) -> list[int] | None:
    value = ctx.constant(index)
    return None if value is None else _to_ints(value)


def _align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _window_attrs(ctx: OpContext, key: str) -> tuple[int, int]:
    values = ctx.required_attr(key)
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise ctx.fail(f"{key} {list(values)} must be [1, h, w, 1] (NHWC, no batch/channel stride)")
    return int(values[1]), int(values[2])


def _check_nhwc(ctx: OpContext) -> None:
    fmt = ctx.attr("data_format", "NHWC")
    if fmt != "NHWC":
        raise ctx.fail(f"data_format {fmt} is not supported (only NHWC)")


def _paddings(
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


# ----------------------------------------------------------------------------------------------
# Sources and plumbing


@register("Const")
def _const(ctx: OpContext) -> OpFn:
    value = ctx.graph.constant(ctx.name)
    assert value is not None
    tensor = torch.from_numpy(np.ascontiguousarray(value))
    if tensor.is_floating_point():  # weights go to the device once; shapes stay on the CPU
        tensor = tensor.to(ctx.device)
    return lambda inputs: [tensor]


@register("Identity", "Snapshot", "StopGradient", "PreventGradient")
def _identity(ctx: OpContext) -> OpFn:
    return lambda inputs: [inputs[0]]


@register("CheckNumerics", "CheckNumericsV2")
def _check_numerics(ctx: OpContext) -> OpFn:
    """TF's NaN/inf guard. In the Inception graph it hangs off control inputs, which the
    executor does not follow, so it runs only when a fetch reads its output."""
    message = ctx.attr("message", "")

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise EvaluationError(
                f"node {ctx.name!r} (CheckNumerics): {message}: tensor has {kind}"
            )
        return [x]

    return run


@register("PlaceholderWithDefault")
def _placeholder_with_default(ctx: OpContext) -> OpFn:
    return lambda inputs: [inputs[0]]


@register("Cast")
def _cast(ctx: OpContext) -> OpFn:
    dtype = _TORCH_DTYPES[numpy_dtype(ctx.required_attr("DstT"), f"node {ctx.name!r}")]
    return lambda inputs: [inputs[0].to(dtype)]


@register("ExpandDims")
def _expand_dims(ctx: OpContext) -> OpFn:
    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        (dim,) = _to_ints(inputs[1])
        if dim < 0:
            dim += inputs[0].dim() + 1
        return [inputs[0].unsqueeze(dim)]

    return run


@register("Squeeze")
def _squeeze(ctx: OpContext) -> OpFn:
    dims = [int(d) for d in ctx.attr("squeeze_dims", [])]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        if not dims:
            return [x.squeeze()] if x.dim() else [x]
        axes = sorted({d % x.dim() for d in dims}, reverse=True)
        for axis in axes:
            if x.shape[axis] != 1:
                raise ctx.fail(f"cannot squeeze dimension {axis} of size {x.shape[axis]}")
            x = x.squeeze(axis)
        return [x]

    return run


@register("Reshape")
def _reshape(ctx: OpContext) -> OpFn:
    static = _static_ints(ctx, 1)

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shape = static if static is not None else _to_ints(inputs[1])
        try:
            return [inputs[0].reshape(shape)]
        except RuntimeError as error:
            raise ctx.fail(f"cannot reshape {list(inputs[0].shape)} to {shape}") from error

    return run


def _concat_builder(axis_index: Callable[[int], int]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        n = len(ctx.inputs)
        where = axis_index(n)
        static = _static_ints(ctx, where)
        values = [i for i in range(n) if i != where]

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            (axis,) = static if static is not None else _to_ints(inputs[where])
            return [torch.cat([inputs[i] for i in values], dim=axis)]

        return run

    return build


# Concat (the 2015 op) takes the axis first; ConcatV2 takes it last.
register("Concat")(_concat_builder(lambda n: 0))
register("ConcatV2")(_concat_builder(lambda n: n - 1))


# ----------------------------------------------------------------------------------------------
# Arithmetic


def _binary(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    in_place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            a, b = _align(inputs[0], inputs[1])
            if (
                ctx.inplace
                and in_place is not None
                and a.dtype == b.dtype
                and a.device == b.device
                and torch.broadcast_shapes(a.shape, b.shape) == a.shape
            ):
                return [in_place(a, b)]
            return [fn(a, b)]

        return run

    return build


register("Add", "AddV2")(_binary(torch.add, torch.Tensor.add_))
register("Sub")(_binary(torch.sub, torch.Tensor.sub_))
register("Mul")(_binary(torch.mul, torch.Tensor.mul_))
register("RealDiv")(_binary(torch.div, torch.Tensor.div_))
register("Maximum")(_binary(torch.maximum))
register("Minimum")(_binary(torch.minimum))


@register("BiasAdd")
def _bias_add(ctx: OpContext) -> OpFn:
    _check_nhwc(ctx)
    return lambda inputs: [inputs[0] + inputs[1]]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[OpContext], OpFn]:
    return lambda ctx: lambda inputs: [fn(inputs[0])]


@register("Relu")
def _relu(ctx: OpContext) -> OpFn:
    fn = torch.relu_ if ctx.inplace else torch.relu
    return lambda inputs: [fn(inputs[0])]


@register("Relu6")
def _relu6(ctx: OpContext) -> OpFn:
    if ctx.inplace:
        return lambda inputs: [inputs[0].clamp_(0.0, 6.0)]
    return lambda inputs: [torch.clamp(inputs[0], 0.0, 6.0)]


register("Rsqrt")(_unary(torch.rsqrt))
register("Sqrt")(_unary(torch.sqrt))
register("Square")(_unary(torch.square))
register("Neg")(_unary(torch.neg))
register("Softmax")(_unary(lambda x: torch.softmax(x, dim=-1)))


@register("MatMul")
def _matmul(ctx: OpContext) -> OpFn:
    transpose_a = bool(ctx.attr("transpose_a", False))
    transpose_b = bool(ctx.attr("transpose_b", False))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        a, b = inputs
        return [(a.T if transpose_a else a) @ (b.T if transpose_b else b)]

    return run


# ----------------------------------------------------------------------------------------------
# Normalisation


def _batchnorm(x: torch.Tensor, mean, scale, offset, inplace: bool) -> torch.Tensor:
    """TF's inference batch norm: ``(x - mean) * (rsqrt(var + eps) * gamma) + beta``.

    In place (same operations, same rounding) when the executor says x is not needed after.
    """
    if inplace:
        return x.sub_(mean).mul_(scale).add_(offset)
    return (x - mean) * scale + offset


@register("BatchNormWithGlobalNormalization")
def _batchnorm_global(ctx: OpContext) -> OpFn:
    eps = float(ctx.required_attr("variance_epsilon"))
    scale_after = bool(ctx.required_attr("scale_after_normalization"))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x, mean, variance, beta, gamma = inputs
        scale = torch.rsqrt(variance + eps)
        if scale_after:
            scale = scale * gamma
        return [_batchnorm(x, mean, scale, beta, ctx.inplace)]

    return run


@register("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _fused_batchnorm(ctx: OpContext) -> OpFn:
    _check_nhwc(ctx)
    if bool(ctx.attr("is_training", True)):
        raise ctx.fail("is_training=True (batch statistics) is not supported in a frozen graph")
    eps = float(ctx.attr("epsilon", 1e-4))
    outputs = 6 if ctx.node.op == "FusedBatchNormV3" else 5  # type: ignore[attr-defined]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x, gamma, beta, mean, variance = inputs[:5]
        y = _batchnorm(x, mean, torch.rsqrt(variance + eps) * gamma, beta, ctx.inplace)
        return [y, mean, variance, mean, variance, mean][:outputs]

    return run


# ----------------------------------------------------------------------------------------------
# Convolution and pooling


@register("Conv2D")
def _conv2d(ctx: OpContext) -> OpFn:
    _check_nhwc(ctx)
    stride = _window_attrs(ctx, "strides")
    dilation = _window_attrs(ctx, "dilations") if "dilations" in ctx.node.attr else (1, 1)  # type: ignore[attr-defined]
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
        top, bottom, left, right = _paddings(
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
    _check_nhwc(ctx)
    kernel = _window_attrs(ctx, "ksize")
    stride = _window_attrs(ctx, "strides")
    padding = ctx.required_attr("padding")

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        top, bottom, left, right = _paddings(ctx, padding, x.shape[1], x.shape[2], kernel, stride)
        xc = x.permute(0, 3, 1, 2)
        if top or bottom or left or right:  # padding never wins a max
            xc = F.pad(xc, (left, right, top, bottom), value=float("-inf"))
        return [F.max_pool2d(xc, kernel, stride).permute(0, 2, 3, 1)]

    return run


@register("AvgPool")
def _avg_pool(ctx: OpContext) -> OpFn:
    _check_nhwc(ctx)
    kernel = _window_attrs(ctx, "ksize")
    stride = _window_attrs(ctx, "strides")
    padding = ctx.required_attr("padding")
    counts_cache: dict[tuple, torch.Tensor] = {}

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        top, bottom, left, right = _paddings(ctx, padding, x.shape[1], x.shape[2], kernel, stride)
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
    static = _static_ints(ctx, 1)
    cache: dict[tuple, tuple] = {}

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0].to(torch.float32)
        out_h, out_w = static if static is not None else _to_ints(inputs[1])
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


# ----------------------------------------------------------------------------------------------
# Executor


# Ops whose output 0 owns its memory: it is a new tensor, never a view of an input or a constant.
_FRESH_OUTPUT = frozenset(
    {
        "Conv2D",
        "BatchNormWithGlobalNormalization",
        "FusedBatchNorm",
        "FusedBatchNormV2",
        "FusedBatchNormV3",
        "Relu",
        "Relu6",
        "MaxPool",
        "AvgPool",
        "ResizeBilinear",
        "Concat",
        "ConcatV2",
        "MatMul",
        "Add",
        "AddV2",
        "Sub",
        "Mul",
        "RealDiv",
        "Maximum",
        "Minimum",
        "BiasAdd",
        "Rsqrt",
        "Sqrt",
        "Square",
        "Neg",
        "Softmax",
    }
)

_VIEW = {0: 0}
_FUSED_BN_ALIASES = {1: 3, 2: 4, 3: 3, 4: 4, 5: 3}  # the statistics come back as they went in

# Outputs that may share memory with an input: {output index: input index}. An in-place op on a
# tensor overwrites every alias of it too, so the executor treats aliases as one buffer.
_ALIASES: dict[str, dict[int, int]] = {
    "Identity": _VIEW,
    "Snapshot": _VIEW,
    "StopGradient": _VIEW,
    "PreventGradient": _VIEW,
    "PlaceholderWithDefault": _VIEW,
    "CheckNumerics": _VIEW,
    "CheckNumericsV2": _VIEW,
    "Cast": _VIEW,  # returns its input when the dtype does not change
    "Reshape": _VIEW,
    "Squeeze": _VIEW,
    "ExpandDims": _VIEW,
    "FusedBatchNorm": _FUSED_BN_ALIASES,
    "FusedBatchNormV2": _FUSED_BN_ALIASES,
    "FusedBatchNormV3": _FUSED_BN_ALIASES,
}


# Ops whose builders can write their result into input 0 (when ``OpContext.inplace``).
_CAN_REUSE_INPUT = frozenset(
    {
        "BatchNormWithGlobalNormalization",
        "FusedBatchNorm",
        "FusedBatchNormV2",
        "FusedBatchNormV3",
        "Relu",
        "Relu6",
        "Add",
        "AddV2",
        "Sub",
        "Mul",
        "RealDiv",
    }
)


@dataclass(eq=False)
class _Buffer:
    """Tensors that may share one piece of memory, and the last step that reads any of them."""

    writable: bool
    last_use: int = -1


class GraphExecutor:
    """Run the part of a GraphDef between fed tensors and fetched tensors.

    Only the nodes that the fetches depend on are built, walking back from the fetches and
    stopping at fed tensors, so the JPEG decoder at the top of the Inception graph is never
    touched when images are fed at ``ExpandDims:0``. Control inputs (``^name``) only order
    nodes in TensorFlow and are not followed: the graph's ``CheckNumerics`` guards never run
    (the evaluator checks its features for NaN/inf itself). Intermediate tensors are dropped as
    soon as their last consumer has run.
    """

    def __init__(
        self,
        graph: TFGraph,
        feeds: Sequence[str],
        fetches: Sequence[str],
        device: torch.device | str = "cpu",
    ) -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.feeds = [tensor_name(f) for f in feeds]
        self.fetches = [tensor_name(f) for f in fetches]
        fed = set(self.feeds)
        for name in self.feeds + self.fetches:
            graph.node(name.rsplit(":", 1)[0])
        self.order = self._topological_order(fed)
        for name in self.order:
            if graph.nodes[name].op == "Placeholder":
                raise ConfigurationError(
                    f"{graph.source}: node {name!r} is a Placeholder that the fetches need but "
                    f"nothing feeds (feeds: {', '.join(self.feeds)})"
                )
        unknown = [graph.nodes[n] for n in self.order if graph.nodes[n].op not in _BUILDERS]
        if unknown:
            node = unknown[0]
            others = sorted({n.op for n in unknown} - {node.op})
            more = f" (also unsupported: {', '.join(others)})" if others else ""
            raise ConfigurationError(
                f"{graph.source}: node {node.name!r} has op type {node.op!r}, which the PyTorch "
                f"executor does not implement{more}; it implements {', '.join(supported_ops())}"
            )
        self._last_use = self._last_uses()
        self._buffers = self._alias_groups()
        self.ops: dict[str, OpFn] = {}
        in_place = []
        for step, name in enumerate(self.order):
            node = graph.nodes[name]
            donate = self._can_donate(step, name)
            if donate:
                in_place.append(name)
            self.ops[name] = _BUILDERS[node.op](OpContext(node, graph, self.device, donate))
        self.in_place = frozenset(in_place)  # nodes allowed to write into their input 0

    def _alias_groups(self) -> dict[str, _Buffer]:
        """Map every tensor to its buffer: the tensors that may share its memory (views,
        Identity, ...) are one buffer, read last at the last step that reads any of them.

        A buffer is writable when an op of ``_FRESH_OUTPUT`` allocated it: never a feed, a
        constant, or the input or output of an op that is in neither table.
        """
        used: dict[str, set[int]] = {}
        for key in self._last_use:
            node, index = parse_input(key)  # type: ignore[misc]
            used.setdefault(node, set()).add(index)
        buffers: dict[str, _Buffer] = {}
        for name in self.order:
            op = self.graph.nodes[name].op
            inputs = [f"{s}:{i}" for s, i in self._data_inputs(name)]
            aliases = _ALIASES.get(op, {})
            if op not in _FRESH_OUTPUT and op not in _ALIASES:
                for key in inputs:  # its outputs may be views of any input: never overwrite one
                    if key in buffers:
                        buffers[key].writable = False
            for index in sorted(used.get(name, set()) | {0}):
                key = f"{name}:{index}"
                source = aliases.get(index)
                if source is not None and source < len(inputs):
                    if inputs[source] not in buffers:  # a feed
                        buffers[inputs[source]] = _Buffer(writable=False)
                    buffers[key] = buffers[inputs[source]]
                else:
                    buffers[key] = _Buffer(writable=index == 0 and op in _FRESH_OUTPUT)
        for key, buffer in buffers.items():
            if key in self.feeds:
                buffer.writable = False
            buffer.last_use = max(buffer.last_use, self._last_use.get(key, -1))
        return buffers

    def _can_donate(self, step: int, name: str) -> bool:
        """May node ``name`` overwrite its input 0? Only if its memory was allocated by an op
        (no feed, no constant) and neither it nor any view of it is read after this step."""
        inputs = [f"{s}:{i}" for s, i in self._data_inputs(name)]
        if self.graph.nodes[name].op not in _CAN_REUSE_INPUT or not inputs:
            return False
        buffer = self._buffers.get(inputs[0])  # None: a feed
        others = [self._buffers.get(k) for k in inputs[1:]]
        return (
            buffer is not None
            and buffer.writable
            and buffer.last_use == step
            and all(o is not buffer for o in others)
        )

    def _data_inputs(self, name: str) -> list[tuple[str, int]]:
        node = self.graph.nodes[name]
        return [parsed for i in node.input if (parsed := parse_input(i)) is not None]

    def _topological_order(self, fed: set[str]) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        for fetch in self.fetches:
            if fetch in fed:
                continue
            stack = [(fetch.rsplit(":", 1)[0], False)]
            while stack:
                name, expanded = stack.pop()
                if expanded:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise ConfigurationError(f"{self.graph.source}: cycle through node {name!r}")
                state[name] = 1
                stack.append((name, True))
                for source, index in self._data_inputs(name):
                    if f"{source}:{index}" in fed:
                        continue
                    if source not in self.graph.nodes:
                        raise ConfigurationError(
                            f"{self.graph.source}: node {name!r} reads {source!r}, which does not exist"
                        )
                    if state.get(source) != 2:
                        if state.get(source) == 1:
                            raise ConfigurationError(
                                f"{self.graph.source}: cycle through node {source!r}"
                            )
                        stack.append((source, False))
        return order

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for step, name in enumerate(self.order):
            for source, index in self._data_inputs(name):
                last[f"{source}:{index}"] = step
        for fetch in self.fetches:
            last[fetch] = len(self.order)
        return last

    @torch.inference_mode()
    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for name, value in feeds.items():
            values[tensor_name(name)] = value
        missing = [f for f in self.feeds if f not in values]
        if missing:
            raise ConfigurationError(f"no value fed for {', '.join(missing)}")
        for step, name in enumerate(self.order):
            inputs = [values[f"{s}:{i}"] for s, i in self._data_inputs(name)]
            outputs = self.ops[name](inputs)
            for index, output in enumerate(outputs):
                key = f"{name}:{index}"
                if self._last_use.get(key, -1) > step:
                    values[key] = output
            for source, index in self._data_inputs(name):
                key = f"{source}:{index}"
                if self._last_use.get(key) == step and key not in self.feeds:
                    values.pop(key, None)
        return [values[f] for f in self.fetches]
