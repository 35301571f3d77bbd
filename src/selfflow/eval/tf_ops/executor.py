"""Runs a parsed GraphDef: topological order, buffer reuse, in-place ops where safe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfflow.base.errors import ConfigurationError
from selfflow.eval.graphdef import TFGraph, parse_input, tensor_name

# the op families register their builders when imported
from selfflow.eval.tf_ops import arithmetic, plumbing, spatial  # noqa: F401
from selfflow.eval.tf_ops.base import BUILDERS, OpContext, OpFn, supported_ops

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
        unknown = [graph.nodes[n] for n in self.order if graph.nodes[n].op not in BUILDERS]
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
            self.ops[name] = BUILDERS[node.op](OpContext(node, graph, self.device, donate))
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
