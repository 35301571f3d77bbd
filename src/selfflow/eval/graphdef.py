"""Read a TensorFlow GraphDef with protobuf alone.

The ADM evaluator's network is a frozen 2015 GraphDef (``classify_image_graph_def.pb``). We do
not port its architecture by hand: we parse the file with the message classes that the
``tensorboard`` package ships (no TensorFlow needed) and later execute its nodes one by one, so
the file stays the single source of truth for weights, shapes and wiring.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import graph_pb2, node_def_pb2, tensor_pb2, types_pb2

from selfflow.base.errors import ConfigurationError

# TensorFlow dtype enum -> numpy dtype, for the types a frozen vision graph holds.
NUMPY_DTYPES: dict[int, np.dtype] = {
    types_pb2.DT_FLOAT: np.dtype(np.float32),
    types_pb2.DT_DOUBLE: np.dtype(np.float64),
    types_pb2.DT_HALF: np.dtype(np.float16),
    types_pb2.DT_INT8: np.dtype(np.int8),
    types_pb2.DT_INT16: np.dtype(np.int16),
    types_pb2.DT_INT32: np.dtype(np.int32),
    types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_UINT8: np.dtype(np.uint8),
    types_pb2.DT_UINT16: np.dtype(np.uint16),
    types_pb2.DT_BOOL: np.dtype(np.bool_),
}

# Where a TensorProto keeps its values when they are not packed into ``tensor_content``.
_VALUE_FIELDS: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
}


def dtype_name(enum: int) -> str:
    """``DT_FLOAT`` style name of a dtype enum, for messages."""
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype #{enum}"


def numpy_dtype(enum: int, where: str) -> np.dtype:
    if enum not in NUMPY_DTYPES:
        raise ConfigurationError(f"{where}: dtype {dtype_name(enum)} is not supported")
    return NUMPY_DTYPES[enum]


def tensor_to_numpy(proto: tensor_pb2.TensorProto, where: str = "tensor") -> np.ndarray:
    """Decode a TensorProto the way TensorFlow does.

    Values are either packed little-endian in ``tensor_content`` or listed in a typed repeated
    field; a list shorter than the shape is padded with its last value (TF's splat rule, used
    for constants such as ``Sub/y`` = 128 stored once).
    """
    dtype = numpy_dtype(proto.dtype, where)
    if proto.tensor_shape.unknown_rank:
        raise ConfigurationError(f"{where}: constant of unknown rank")
    shape = tuple(int(dim.size) for dim in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise ConfigurationError(f"{where}: constant with unknown dimension {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if proto.tensor_content:
        raw = np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<"))
        if raw.size != count:
            raise ConfigurationError(
                f"{where}: tensor_content holds {raw.size} values, shape {list(shape)} needs {count}"
            )
        return raw.astype(dtype).reshape(shape)
    values = getattr(proto, _VALUE_FIELDS[proto.dtype])
    if proto.dtype == types_pb2.DT_HALF:  # half_val stores the 16-bit patterns as ints
        flat = np.asarray(list(values), dtype=np.uint16).view(np.float16)
    else:
        flat = np.asarray(list(values), dtype=dtype)
    if flat.size > count:
        raise ConfigurationError(
            f"{where}: {flat.size} values listed, shape {list(shape)} holds only {count}"
        )
    if flat.size == 0:
        flat = np.zeros(count, dtype=dtype)
    elif flat.size < count:
        flat = np.concatenate([flat, np.full(count - flat.size, flat[-1], dtype=dtype)])
    return flat.reshape(shape)


def parse_input(name: str) -> tuple[str, int] | None:
    """Split a NodeDef input ``"node:1"`` into ``("node", 1)``; ``None`` for control inputs."""
    if name.startswith("^"):
        return None
    node, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return node, int(index)
    return name, 0


def tensor_name(name: str) -> str:
    """Canonical ``node:index`` spelling of a tensor name (``"pool_3"`` -> ``"pool_3:0"``)."""
    parsed = parse_input(name)
    if parsed is None:
        raise ConfigurationError(f"{name!r} names a control dependency, not a tensor")
    return f"{parsed[0]}:{parsed[1]}"


_MISSING: Any = object()


def get_attr(node: node_def_pb2.NodeDef, key: str, default: Any = _MISSING) -> Any:
    """A node attribute as a plain Python value (str, int, float, bool, list, TensorProto)."""
    if key not in node.attr:
        if default is _MISSING:
            raise ConfigurationError(
                f"node {node.name!r} ({node.op}) lacks the attribute {key!r} that the op needs"
            )
        return default
    value = node.attr[key]
    kind = value.WhichOneof("value")
    if kind == "s":
        return value.s.decode("utf-8", errors="replace")
    if kind in ("i", "f", "b", "type", "tensor", "shape"):
        return getattr(value, kind)
    if kind == "list":
        lst = value.list
        for list_kind in ("i", "f", "s", "b", "type", "shape", "tensor"):
            items = list(getattr(lst, list_kind))
            if items:
                if list_kind == "s":
                    return [item.decode("utf-8", errors="replace") for item in items]
                return items
        return []
    return default if default is not _MISSING else None


@dataclass
class TFGraph:
    """A parsed GraphDef: its nodes by name, plus where it came from."""

    nodes: dict[str, node_def_pb2.NodeDef]
    producer: int = 0
    source: str = "<memory>"
    sha256: str | None = None
    _constants: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<memory>") -> TFGraph:
        graph_def = graph_pb2.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            raise ConfigurationError(
                f"{source} is not a readable TensorFlow GraphDef (protobuf: {error}); "
                f"expected a binary .pb such as ADM's classify_image_graph_def.pb"
            ) from error
        if not graph_def.node:
            raise ConfigurationError(
                f"{source} holds no graph nodes ({len(data)} bytes); expected a binary "
                f"TensorFlow GraphDef such as ADM's classify_image_graph_def.pb"
            )
        nodes: dict[str, node_def_pb2.NodeDef] = {}
        for node in graph_def.node:
            if not node.name or node.name in nodes:
                raise ConfigurationError(
                    f"{source} is not a valid GraphDef: node name {node.name!r} is empty or repeated"
                )
            nodes[node.name] = node
        digest = hashlib.sha256(data).hexdigest()
        return cls(nodes=nodes, producer=graph_def.versions.producer, source=source, sha256=digest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TFGraph:
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"Inception graph {path} does not exist (expected a .pb file)")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    def node(self, name: str) -> node_def_pb2.NodeDef:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigurationError(f"{self.source} has no node named {name!r}") from None

    def resolve(self, name: str) -> str:
        """Follow Identity nodes back to the node that really produces a tensor."""
        seen = set()
        node, index = parse_input(name) or (name, 0)
        while node in self.nodes and self.nodes[node].op in ("Identity", "Snapshot"):
            if node in seen:
                raise ConfigurationError(f"{self.source}: Identity cycle through {node!r}")
            seen.add(node)
            inputs = [i for i in self.nodes[node].input if not i.startswith("^")]
            node, index = parse_input(inputs[0])  # type: ignore[misc]
        return f"{node}:{index}"

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor when it is a Const (through Identity), else ``None``."""
        node_name, index = parse_input(self.resolve(name))  # type: ignore[misc]
        node = self.nodes.get(node_name)
        if node is None or node.op != "Const" or index != 0:
            return None
        if node_name not in self._constants:
            value = get_attr(node, "value")
            self._constants[node_name] = tensor_to_numpy(value, where=f"node {node_name!r}")
        return self._constants[node_name]
