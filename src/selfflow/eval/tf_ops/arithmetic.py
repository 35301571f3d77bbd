"""Arithmetic and normalisation: element-wise ops, ReLUs, MatMul and batch normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from selfflow.eval.tf_ops.base import (
    OpContext,
    OpFn,
    align,
    check_nhwc,
    register,
)

# ----------------------------------------------------------------------------------------------
# Arithmetic


def _binary(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    in_place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            a, b = align(inputs[0], inputs[1])
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
    check_nhwc(ctx)
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
    check_nhwc(ctx)
    if bool(ctx.attr("is_training", True)):
        raise ctx.fail("is_training=True (batch statistics) is not supported in a frozen graph")
    eps = float(ctx.attr("epsilon", 1e-4))
    outputs = 6 if ctx.node.op == "FusedBatchNormV3" else 5  # type: ignore[attr-defined]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x, gamma, beta, mean, variance = inputs[:5]
        y = _batchnorm(x, mean, torch.rsqrt(variance + eps) * gamma, beta, ctx.inplace)
        return [y, mean, variance, mean, variance, mean][:outputs]

    return run
