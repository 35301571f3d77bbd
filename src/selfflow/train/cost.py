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
        f"compute: {flop_text(flops)} per image per step at {model.in_channels}×{side}×"
        f"{side} latents ({model.num_tokens} tokens); {flop_text(flops * per_gpu_images)} "
        f"per GPU per step ({per_gpu_images:g} images)",
        f"memory: {_bytes_text(state)} of training state per GPU (weights, gradients, Adam, "
        f"EMA{', sharded' if sharded else ''}); activations come on top (measure them with "
        f"{bench})",
    ]


def validation_cost_line(model: ModelConfig, settings: Any, rows: int) -> str:
    """What ``--val-every`` costs: one validation's FLOPs
    (:func:`selfflow.train.validation.validation_flops`) and their share of the training
    compute of the ``val_every`` steps between two (each step ``train_step_flops`` × the
    global batch), so a user can choose K before the run, not from its logs."""
    from selfflow.train.validation import VAL_TAUS, validation_flops

    rep = settings.rep_weight > 0
    flops = validation_flops(model, rows, rep=rep, teacher_layer=settings.teacher_layer)
    steps = train_step_flops(
        model, teacher_layer=settings.teacher_layer, rep_weight=settings.rep_weight
    ) * (settings.global_batch_size * settings.val_every)
    return (
        f"validation: {rows} held-out rows × {len(VAL_TAUS)} noise levels every "
        f"{settings.val_every} steps, {flop_text(flops)} each: {_figures(100 * flops / steps)} "
        f"% of the training compute between two"
    )


def flop_text(flops: float) -> str:
    """``32.5 PFLOP``, ``889 GFLOP``, ``4.2 MFLOP``: three figures in the unit that fits (a
    tiny model's step is not "0.0 GFLOP")."""
    scale, unit = next(((k, u) for k, u in _FLOP_UNITS if flops >= k), _FLOP_UNITS[-1])
    return f"{_figures(flops / scale)} {unit}"


def _figures(value: float) -> str:
    """Three significant figures without an exponent: ``32.5``, ``889``, ``1,500``."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


_FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"))


def run_cost_lines(trainer: Any) -> list[str]:
    """:func:`cost_lines` of a :class:`~selfflow.train.trainer.Trainer` set up for its data,
    and with ``--val-every`` the validation's (:func:`validation_cost_line`)."""
    resolved = trainer.resolved
    s = resolved.settings
    lines = cost_lines(
        resolved.model,
        s,
        trainer.num_parameters,
        trainer.context.world_size,
        bool(trainer.config.fsdp),
        trainer.card.convention.factor,
    )
    if s.val_every:
        from selfflow.data import LatentDataset

        rows = min(len(LatentDataset(s.val_data, check_files=False)), s.val_samples)
        lines.append(validation_cost_line(resolved.model, s, rows))
    return lines


def _bytes_text(count: float) -> str:
    """GiB for a real model's state, MiB for a toy's (not "0.00 GiB")."""
    if count >= 2**30 / 10:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.2f} MiB"
