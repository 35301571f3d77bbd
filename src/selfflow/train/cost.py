"""What a run costs per step, said by ``train --dry-run`` before any GPU is held.

The FLOPs are :func:`selfflow.train.network.train_step_flops` (checked against PyTorch's FLOP
counter at 256 and at 512) for the data's own latent shape: XL/2 at 512 × 512 sees 1 024
tokens instead of 256, so its step costs about 4.4 times as much per image (attention grows
with the square of the tokens). The memory is the training state each GPU holds: float32
weights, gradients, Adam's two moments and the EMA (the teacher), 20 bytes per parameter,
divided over the processes under FSDP. Activations come on top and depend on the batch, the
compiler and the attention kernel: ``benchmarks/train_throughput.py --image-size 512`` measures
the peak.
"""

from __future__ import annotations

from typing import Any

from selfflow.model.network import ModelConfig
from selfflow.train.network import train_step_flops

STATE_BYTES_PER_PARAMETER = 4 + 4 + 8 + 4  # weights, gradients, Adam moments, EMA (float32)


def cost_lines(
    model: ModelConfig,
    settings: Any,
    num_parameters: int,
    world_size: int,
    sharded: bool,
    factor: int | None = 8,
) -> list[str]:
    """The dry run's lines on compute and memory for ``model`` trained with ``settings``
    (``factor``: the VAE's downsampling, for the benchmark's command)."""
    flops = train_step_flops(
        model, teacher_layer=settings.teacher_layer, rep_weight=settings.rep_weight
    )
    per_gpu_images = settings.global_batch_size / max(world_size, 1)
    state = num_parameters * STATE_BYTES_PER_PARAMETER / (world_size if sharded else 1)
    side = model.input_size
    bench = "benchmarks/train_throughput.py" + (
        f" --image-size {side * factor} --latent-channels {model.in_channels}" if factor else ""
    )
    return [
        f"compute: {flops / 1e9:,.1f} GFLOP per image per step at {model.in_channels}×{side}×"
        f"{side} latents ({model.num_tokens} tokens); {flops * per_gpu_images / 1e12:,.1f} "
        f"TFLOP per GPU per step ({per_gpu_images:g} images)",
        f"memory: {state / 2**30:.2f} GiB of training state per GPU (weights, gradients, Adam, "
        f"EMA{', sharded' if sharded else ''}); activations come on top (measure them with "
        f"{bench})",
    ]


def run_cost_lines(trainer: Any) -> list[str]:
    """:func:`cost_lines` of a :class:`~selfflow.train.trainer.Trainer` set up for its data."""
    resolved = trainer.resolved
    return cost_lines(
        resolved.model,
        resolved.settings,
        trainer.num_parameters,
        trainer.context.world_size,
        bool(trainer.config.fsdp),
        trainer.card.convention.factor,
    )
