"""Synthetic Inception-shaped GraphDefs, written with protobuf alone.

Tests and the evaluator benchmark need a graph with the *structure* of ADM's
``classify_image_graph_def.pb`` (2015 Inception-v3) without downloading it: the same node names
(``ExpandDims``, ``conv``, ``mixed_6/conv``, ``pool_3``, ``softmax/logits/MatMul`` ...), the same
op types and 2015-style attributes (``BatchNormWithGlobalNormalization``, the old ``Concat``
with the axis first, ``ResizeBilinear`` without ``half_pixel_centers``; in front of every ReLU
or pool ``X``, ``X/CheckNumerics`` and ``X/control_dependency``, an Identity with the control
input ``^X/CheckNumerics``), the same spatial sizes
(299 -> 149 -> ... -> 17 -> 8 -> 1), and random weights. ``width`` scales every channel count:
1.0 gives the real 2048-dimensional pool_3 and the real cost per image.

The GraphDef producer version is set below 9, as in the 2015 file: TensorFlow refuses
``BatchNormWithGlobalNormalization`` in graphs that claim a newer version.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tensorboard.compat.proto import attr_value_pb2, graph_pb2, tensor_pb2, types_pb2

GRAPH_PRODUCER = 8  # < 9: BatchNormWithGlobalNormalization is still allowed


@dataclass(frozen=True)
class DType:
    """Marks an attribute value as a dtype enum (``DType(types_pb2.DT_FLOAT)``)."""

    enum: int


FLOAT = DType(types_pb2.DT_FLOAT)
INT32 = DType(types_pb2.DT_INT32)

_NP_TO_ENUM = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.uint8): types_pb2.DT_UINT8,
}


def tensor_proto(array: np.ndarray, packed: bool = True) -> tensor_pb2.TensorProto:
    """A TensorProto for ``array``: packed bytes, or a typed value list when ``packed`` is false."""
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto(dtype=_NP_TO_ENUM[array.dtype])
    for size in array.shape:
        proto.tensor_shape.dim.add(size=int(size))
    if packed and array.ndim > 0:
        proto.tensor_content = (
            np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        )
    elif array.dtype == np.float32:
        proto.float_val.extend(array.reshape(-1).tolist())
    elif array.dtype == np.float64:
        proto.double_val.extend(array.reshape(-1).tolist())
    elif array.dtype == np.int64:
        proto.int64_val.extend(array.reshape(-1).tolist())
    else:
        proto.int_val.extend(int(v) for v in array.reshape(-1))
    return proto


def _attr(value) -> attr_value_pb2.AttrValue:
    if isinstance(value, DType):
        return attr_value_pb2.AttrValue(type=value.enum)
    if isinstance(value, bool):
        return attr_value_pb2.AttrValue(b=value)
    if isinstance(value, int):
        return attr_value_pb2.AttrValue(i=value)
    if isinstance(value, float):
        return attr_value_pb2.AttrValue(f=value)
    if isinstance(value, str):
        return attr_value_pb2.AttrValue(s=value.encode())
    if isinstance(value, tensor_pb2.TensorProto):
        return attr_value_pb2.AttrValue(tensor=value)
    if isinstance(value, (list, tuple)):
        attr = attr_value_pb2.AttrValue()
        attr.list.SetInParent()
        if all(isinstance(v, int) for v in value):
            attr.list.i.extend(value)
        elif all(isinstance(v, float) for v in value):
            attr.list.f.extend(value)
        else:
            raise TypeError(f"unsupported list attribute {value!r}")
        return attr
    raise TypeError(f"unsupported attribute value {value!r}")


class GraphBuilder:
    """Append NodeDefs to a GraphDef by name, op type, inputs and attributes."""

    def __init__(self, producer: int = GRAPH_PRODUCER) -> None:
        self.graph = graph_pb2.GraphDef()
        self.graph.versions.producer = producer

    def node(self, name: str, op: str, inputs: Iterable[str] = (), **attrs) -> str:
        node = self.graph.node.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(_attr(value))
        return name

    def const(self, name: str, value: np.ndarray, packed: bool = True) -> str:
        value = np.asarray(value)
        return self.node(
            name, "Const", dtype=DType(_NP_TO_ENUM[value.dtype]), value=tensor_proto(value, packed)
        )

    def to_bytes(self) -> bytes:
        return self.graph.SerializeToString()


class _InceptionWriter:
    """Writes the 2015 Inception-v3 topology with scaled widths and random weights."""

    def __init__(
        self, width: float, seed: int, classes: int, image_size: int, logit_scale: float
    ) -> None:
        self.b = GraphBuilder()
        self.width = width
        self.image_size = image_size
        self.logit_scale = logit_scale
        self.rng = np.random.default_rng(seed)
        self.classes = classes

    def ch(self, channels: int) -> int:
        return max(8, int(round(channels * self.width)))

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: int = 1,
        padding: str = "SAME",
    ) -> tuple[str, int]:
        """conv2d_params -> Conv2D -> batchnorm (2015 op) -> CheckNumerics and
        control_dependency -> Relu named ``name``, as in the 2015 graph."""
        b, rng = self.b, self.rng
        kh, kw = kernel
        cout = self.ch(cout)
        fan_in = kh * kw * cin
        filt = rng.standard_normal((kh, kw, cin, cout)) * np.sqrt(2.0 / fan_in)
        params = b.const(f"{name}/conv2d_params", filt.astype(np.float32))
        conv = b.node(
            f"{name}/Conv2D",
            "Conv2D",
            [x, params],
            T=FLOAT,
            padding=padding,
            strides=[1, stride, stride, 1],
            use_cudnn_on_gpu=True,
        )
        bn = f"{name}/batchnorm"
        beta = b.const(f"{bn}/beta", (0.1 * rng.standard_normal(cout)).astype(np.float32))
        gamma = b.const(f"{bn}/gamma", rng.uniform(0.8, 1.2, cout).astype(np.float32))
        mean = b.const(f"{bn}/moving_mean", (0.1 * rng.standard_normal(cout)).astype(np.float32))
        var = b.const(f"{bn}/moving_variance", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        norm = b.node(
            bn,
            "BatchNormWithGlobalNormalization",
            [conv, mean, var, beta, gamma],
            T=FLOAT,
            variance_epsilon=0.001,
            scale_after_normalization=True,
        )
        return b.node(name, "Relu", [self.checked(name, norm)], T=FLOAT), cout

    def checked(self, name: str, x: str) -> str:
        """``name/CheckNumerics`` on x, and ``name/control_dependency``: x, after the check.

        The 2015 graph guards every layer's input this way; the check is reached only through
        the Identity's control input (``^name/CheckNumerics``), never through a data edge.
        """
        check = self.b.node(
            f"{name}/CheckNumerics", "CheckNumerics", [x], T=FLOAT, message=f"{name}: NaN or Inf"
        )
        return self.b.node(f"{name}/control_dependency", "Identity", [x, f"^{check}"], T=FLOAT)

    def pool(self, name: str, x: str, op: str, kernel: int, stride: int, padding: str) -> str:
        return self.b.node(
            name,
            op,
            [self.checked(name, x)],
            T=FLOAT,
            ksize=[1, kernel, kernel, 1],
            strides=[1, stride, stride, 1],
            padding=padding,
        )

    def join(self, name: str, parts: Sequence[tuple[str, int]]) -> tuple[str, int]:
        axis = self.b.const(f"{name}/concat_dim", np.array(3, dtype=np.int32), packed=False)
        out = self.b.node(name, "Concat", [axis, *(p for p, _ in parts)], N=len(parts), T=FLOAT)
        return out, sum(c for _, c in parts)

    def block_a(self, name: str, x: str, cin: int, pool_channels: int) -> tuple[str, int]:
        c = self.conv
        b1 = c(f"{name}/conv", x, cin, 64, (1, 1))
        t = c(f"{name}/tower/conv", x, cin, 48, (1, 1))
        b2 = c(f"{name}/tower/conv_1", t[0], t[1], 64, (5, 5))
        t = c(f"{name}/tower_1/conv", x, cin, 64, (1, 1))
        t = c(f"{name}/tower_1/conv_1", t[0], t[1], 96, (3, 3))
        b3 = c(f"{name}/tower_1/conv_2", t[0], t[1], 96, (3, 3))
        p = self.pool(f"{name}/tower_2/pool", x, "AvgPool", 3, 1, "SAME")
        b4 = c(f"{name}/tower_2/conv", p, cin, pool_channels, (1, 1))
        return self.join(f"{name}/join", [b1, b2, b3, b4])

    def block_b(self, name: str, x: str, cin: int) -> tuple[str, int]:
        c = self.conv
        b1 = c(f"{name}/conv", x, cin, 384, (3, 3), 2, "VALID")
        t = c(f"{name}/tower/conv", x, cin, 64, (1, 1))
        t = c(f"{name}/tower/conv_1", t[0], t[1], 96, (3, 3))
        b2 = c(f"{name}/tower/conv_2", t[0], t[1], 96, (3, 3), 2, "VALID")
        p = self.pool(f"{name}/pool", x, "MaxPool", 3, 2, "VALID")
        return self.join(f"{name}/join", [b1, b2, (p, cin)])

    def block_c(self, name: str, x: str, cin: int, c7: int) -> tuple[str, int]:
        c = self.conv
        b1 = c(f"{name}/conv", x, cin, 192, (1, 1))
        t = c(f"{name}/tower/conv", x, cin, c7, (1, 1))
        t = c(f"{name}/tower/conv_1", t[0], t[1], c7, (1, 7))
        b2 = c(f"{name}/tower/conv_2", t[0], t[1], 192, (7, 1))
        t = c(f"{name}/tower_1/conv", x, cin, c7, (1, 1))
        t = c(f"{name}/tower_1/conv_1", t[0], t[1], c7, (7, 1))
        t = c(f"{name}/tower_1/conv_2", t[0], t[1], c7, (1, 7))
        t = c(f"{name}/tower_1/conv_3", t[0], t[1], c7, (7, 1))
        b3 = c(f"{name}/tower_1/conv_4", t[0], t[1], 192, (1, 7))
        p = self.pool(f"{name}/tower_2/pool", x, "AvgPool", 3, 1, "SAME")
        b4 = c(f"{name}/tower_2/conv", p, cin, 192, (1, 1))
        return self.join(f"{name}/join", [b1, b2, b3, b4])

    def block_d(self, name: str, x: str, cin: int) -> tuple[str, int]:
        c = self.conv
        t = c(f"{name}/tower/conv", x, cin, 192, (1, 1))
        b1 = c(f"{name}/tower/conv_1", t[0], t[1], 320, (3, 3), 2, "VALID")
        t = c(f"{name}/tower_1/conv", x, cin, 192, (1, 1))
        t = c(f"{name}/tower_1/conv_1", t[0], t[1], 192, (1, 7))
        t = c(f"{name}/tower_1/conv_2", t[0], t[1], 192, (7, 1))
        b2 = c(f"{name}/tower_1/conv_3", t[0], t[1], 192, (3, 3), 2, "VALID")
        p = self.pool(f"{name}/pool", x, "MaxPool", 3, 2, "VALID")
        return self.join(f"{name}/join", [b1, b2, (p, cin)])

    def block_e(self, name: str, x: str, cin: int, pool_op: str) -> tuple[str, int]:
        c = self.conv
        b1 = c(f"{name}/conv", x, cin, 320, (1, 1))
        t = c(f"{name}/tower/conv", x, cin, 384, (1, 1))
        m1 = c(f"{name}/tower/mixed/conv", t[0], t[1], 384, (1, 3))
        m2 = c(f"{name}/tower/mixed/conv_1", t[0], t[1], 384, (3, 1))
        b2 = self.join(f"{name}/tower/mixed", [m1, m2])
        t = c(f"{name}/tower_1/conv", x, cin, 448, (1, 1))
        t = c(f"{name}/tower_1/conv_1", t[0], t[1], 384, (3, 3))
        m1 = c(f"{name}/tower_1/mixed/conv", t[0], t[1], 384, (1, 3))
        m2 = c(f"{name}/tower_1/mixed/conv_1", t[0], t[1], 384, (3, 1))
        b3 = self.join(f"{name}/tower_1/mixed", [m1, m2])
        p = self.pool(f"{name}/tower_2/pool", x, pool_op, 3, 1, "SAME")
        b4 = c(f"{name}/tower_2/conv", p, cin, 192, (1, 1))
        return self.join(f"{name}/join", [b1, b2, b3, b4])

    def build(self) -> bytes:
        b, c = self.b, self.conv
        # Input section: JPEG bytes -> uint8 image -> float -> batch of one (ADM feeds here).
        contents = b.node("DecodeJpeg/contents", "Placeholder", dtype=DType(types_pb2.DT_STRING))
        decoded = b.node(
            "DecodeJpeg",
            "DecodeJpeg",
            [contents],
            channels=3,
            ratio=1,
            fancy_upscaling=True,
            try_recover_truncated=False,
            acceptable_fraction=1.0,
        )
        cast = b.node("Cast", "Cast", [decoded], SrcT=DType(types_pb2.DT_UINT8), DstT=FLOAT)
        dim = b.const("ExpandDims/dim", np.array(0, dtype=np.int32), packed=False)
        expanded = b.node("ExpandDims", "ExpandDims", [cast, dim], T=FLOAT)
        size = b.const("ResizeBilinear/size", np.array([self.image_size] * 2, dtype=np.int32))
        resized = b.node(
            "ResizeBilinear", "ResizeBilinear", [expanded, size], T=FLOAT, align_corners=False
        )
        sub_y = b.const("Sub/y", np.array(128.0, dtype=np.float32), packed=False)
        sub = b.node("Sub", "Sub", [resized, sub_y], T=FLOAT)
        mul_y = b.const("Mul/y", np.array(1.0 / 128.0, dtype=np.float32), packed=False)
        x = (b.node("Mul", "Mul", [sub, mul_y], T=FLOAT), 3)
        # Stem.
        x = c("conv", x[0], x[1], 32, (3, 3), 2, "VALID")
        x = c("conv_1", x[0], x[1], 32, (3, 3), 1, "VALID")
        x = c("conv_2", x[0], x[1], 64, (3, 3), 1, "SAME")
        x = (self.pool("pool", x[0], "MaxPool", 3, 2, "VALID"), x[1])
        x = c("conv_3", x[0], x[1], 80, (1, 1), 1, "VALID")
        x = c("conv_4", x[0], x[1], 192, (3, 3), 1, "VALID")
        x = (self.pool("pool_1", x[0], "MaxPool", 3, 2, "VALID"), x[1])
        # Inception blocks: 35x35, 17x17, 8x8.
        x = self.block_a("mixed", x[0], x[1], 32)
        x = self.block_a("mixed_1", x[0], x[1], 64)
        x = self.block_a("mixed_2", x[0], x[1], 64)
        x = self.block_b("mixed_3", x[0], x[1])
        for name, c7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
            x = self.block_c(name, x[0], x[1], c7)
        x = self.block_d("mixed_8", x[0], x[1])
        x = self.block_e("mixed_9", x[0], x[1], "AvgPool")
        x = self.block_e("mixed_10", x[0], x[1], "MaxPool")
        pool3 = self.pool("pool_3", x[0], "AvgPool", final_map_size(self.image_size), 1, "VALID")
        features = x[1]
        shape = b.const("pool_3/_reshape/shape", np.array([1, features], dtype=np.int32))
        flat = b.node("pool_3/_reshape", "Reshape", [pool3, shape], T=FLOAT)
        # Classifier: ADM uses input 1 of softmax/logits/MatMul (no bias) for the IS.
        scale = self.logit_scale / np.sqrt(features)
        weights = self.rng.standard_normal((features, self.classes)) * scale
        # ReLU features share a large positive component; zero-sum columns ignore it, so the
        # class probabilities follow what differs between images (a useful IS in tests).
        weights -= weights.mean(axis=0, keepdims=True)
        w = b.const("softmax/weights", weights.astype(np.float32))
        bias = b.const(
            "softmax/biases", (0.1 * self.rng.standard_normal(self.classes)).astype(np.float32)
        )
        matmul = b.node(
            "softmax/logits/MatMul",
            "MatMul",
            [flat, w],
            T=FLOAT,
            transpose_a=False,
            transpose_b=False,
        )
        logits = b.node("softmax/logits", "Add", [matmul, bias], T=FLOAT)
        b.node("softmax", "Softmax", [logits], T=FLOAT)
        return b.to_bytes()


def final_map_size(image_size: int) -> int:
    """Side of mixed_10's map for a given network input (8 for 299): pool_3's window."""
    side = (image_size - 3) // 2 + 1 - 2  # conv (3x3/2), conv_1 (3x3)
    side = (side - 3) // 2 + 1 - 2  # pool (3x3/2), conv_4 (3x3)
    for _ in range(3):  # pool_1, mixed_3, mixed_8: 3x3/2 VALID
        side = (side - 3) // 2 + 1
    return side


def inception_like_graph(
    width: float = 0.125,
    seed: int = 0,
    classes: int = 1008,
    image_size: int = 299,
    logit_scale: float = 3.0,
) -> bytes:
    """Serialized GraphDef with the 2015 Inception-v3 structure, node names and op types.

    ``width`` scales channel counts (at least 8 each); ``width=1.0`` matches the real graph's
    shapes (2048 pool features, 23.8 M weights) and cost, with random weights. ``image_size``
    is the graph's internal resize target (299 in ADM's graph; 75 gives a 3 x 3 mixed_6 map,
    63 spatial features, and fast tests). ``logit_scale`` sets the classifier weights' size
    (logits ~ logit_scale * |pool| / sqrt(features)), i.e. how confident the softmax is.
    """
    if final_map_size(image_size) < 1:
        raise ValueError(f"image_size {image_size} is too small for the Inception stem (>= 75)")
    return _InceptionWriter(width, seed, classes, image_size, logit_scale).build()
