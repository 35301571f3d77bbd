"""Sources and plumbing: constants, identities, casts, shape changes and concatenation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from selfflow.base.errors import EvaluationError
from selfflow.eval.graphdef import numpy_dtype
from selfflow.eval.tf_ops.base import (
    TORCH_DTYPES,
    OpContext,
    OpFn,
    register,
    static_ints,
    to_ints,
)

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
    dtype = TORCH_DTYPES[numpy_dtype(ctx.required_attr("DstT"), f"node {ctx.name!r}")]
    return lambda inputs: [inputs[0].to(dtype)]


@register("ExpandDims")
def _expand_dims(ctx: OpContext) -> OpFn:
    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        (dim,) = to_ints(inputs[1])
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
    static = static_ints(ctx, 1)

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shape = static if static is not None else to_ints(inputs[1])
        try:
            return [inputs[0].reshape(shape)]
        except RuntimeError as error:
            raise ctx.fail(f"cannot reshape {list(inputs[0].shape)} to {shape}") from error

    return run


def _concat_builder(axis_index: Callable[[int], int]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        n = len(ctx.inputs)
        where = axis_index(n)
        static = static_ints(ctx, where)
        values = [i for i in range(n) if i != where]

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            (axis,) = static if static is not None else to_ints(inputs[where])
            return [torch.cat([inputs[i] for i in values], dim=axis)]

        return run

    return build


# Concat (the 2015 op) takes the axis first; ConcatV2 takes it last.
register("Concat")(_concat_builder(lambda n: 0))
register("ConcatV2")(_concat_builder(lambda n: n - 1))
