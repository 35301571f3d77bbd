"""How the trainer's processes share one step: DDP or FSDP2 seen through :class:`Parallel`.

:class:`~selfflow.train.step.TrainStep` knows nothing of process groups; this subclass gives it
what DDP and FSDP2 need (no gradient reduction until the last micro-batch, metrics all-reduced
on the device, FSDP modules re-sharded after the update). A single process uses the base class.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from selfflow.train.step import Parallel


class TrainerProcesses(Parallel):
    """The trainer's processes as a step sees them: gradient accumulation without reducing
    until the last micro-batch (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``), the
    metrics all-reduced on the device, FSDP modules re-sharded after the update."""

    def __init__(self, trainer: Any) -> None:
        self.context = trainer.context
        self.student, self.teacher = trainer.student, trainer.teacher
        self.sharded = trainer.sharded
        # DDP's gradients are views of its buckets (gradient_as_bucket_view): zero, keep them
        self.release_gradients = self.sharded or not self.context.is_distributed

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        if not self.context.is_distributed:
            return contextlib.nullcontext()
        if self.sharded:
            self.student.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.student.no_sync()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.context.is_distributed:
            return values
        import torch.distributed as dist

        dist.all_reduce(values)  # on the device: no wait for the host
        values[:-1] /= self.context.world_size
        return values

    def after_update(self) -> None:
        if self.sharded:
            # FSDP2 keeps a root module's parameters gathered after a forward without backward
            # (the teacher's); shard both again so the EMA update pairs shard with shard
            self.student.reshard()
            self.teacher.reshard()
