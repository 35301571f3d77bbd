"""One optimiser step of the recipe, queued on the device without waiting for it.

:class:`TrainStep` is what ``selfflow train`` runs every step and what
``benchmarks/train_throughput.py`` times, so the benchmark measures the trainer's own step.
In order:

1. For each micro-batch: the Self-Flow loss (under bf16 autocast when asked), scaled by the
   micro-batch's share of the process's rows, then backward; the gradient is reduced across
   processes on the last micro-batch only (:meth:`Parallel.accumulating`). The metrics are
   summed on the device.
2. The gradient is clipped; the metrics are averaged over processes (one small all-reduce).
3. AdamW steps (fused on CUDA, for-each under FSDP), then the EMA follows:
   ``ema ← ema + w·(θ − ema)`` with ``w = 1 − decay`` (:func:`~selfflow.train.ema.update_ema`,
   one multi-tensor call).

No value leaves the device during the step: it returns the summary as a device tensor, and the
caller reads it later with :class:`SummaryReader`, one step behind (on CUDA, while the GPU runs
the next step). So a non-finite loss is seen one step late: the trainer reads every pending
summary before it writes a checkpoint, samples or evaluates, and stops at the first non-finite
one, so nothing computed from it is ever kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfflow.train.ema import update_ema
from selfflow.train.objective import self_flow_loss
from selfflow.train.streams import MicroBatch

#: What :meth:`TrainStep.__call__` returns, in this order (float64, on the device).
SUMMARY_FIELDS = ("loss", "flow", "rep", "grad_norm", "stop")


@dataclass(frozen=True)
class StepRecipe:
    """The recipe's numbers that one step uses (``ResolvedConfig.settings`` has them all)."""

    rep_weight: float
    student_layer: int
    teacher_layer: int
    grad_clip: float
    ema_decay: float

    @classmethod
    def of(cls, settings: object) -> StepRecipe:
        """The step's part of a run's resolved settings (``ResolvedConfig.settings``)."""
        names = ("rep_weight", "student_layer", "teacher_layer", "grad_clip", "ema_decay")
        return cls(**{name: getattr(settings, name) for name in names})


class Parallel:
    """What a step needs from its processes; this base class is one process (no-ops).

    The trainer's subclass reduces gradients only on the last micro-batch (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``), all-reduces the metrics, and re-shards FSDP
    modules after the update.
    """

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward; ``last``: reduce gradients."""
        return contextlib.nullcontext()

    def mean(self, values: Tensor) -> Tensor:
        """Mean of the metrics over processes, sum of the last value (the stop flag)."""
        return values

    def after_update(self) -> None:
        """Called after AdamW, before the EMA update."""

    #: Free the gradients after each step (``zero_grad(set_to_none=True)``). DDP with
    #: ``gradient_as_bucket_view`` wants them zeroed in place instead: then they stay views of
    #: its reduction buckets, and accumulation adds into those rather than into new tensors.
    release_gradients: bool = True


class TrainStep:
    """One optimiser step; ``step(batches, stop)`` returns the summary of ``SUMMARY_FIELDS``.

    ``student`` and ``teacher`` are the modules called (wrapped for DDP or FSDP as the caller
    chose), ``model`` and ``ema`` their unwrapped selves whose parameters are updated; with
    ``rep_weight == 0`` the teacher is never called. ``autocast``: bf16 autocast when
    ``torch.bfloat16``, none when None (float32, or a network with its own precision). ``stop``
    is this process's stop request (a signal), or a function asked for it after the backward
    passes; it is summed over processes into the summary.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        model: nn.Module,
        ema: nn.Module,
        optimizer: torch.optim.Optimizer,
        recipe: StepRecipe,
        autocast: torch.dtype | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        self.student, self.teacher, self.model, self.ema = student, teacher, model, ema
        self.optimizer, self.recipe = optimizer, recipe
        self.autocast, self.parallel = autocast, parallel or Parallel()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device

    def __call__(
        self, batches: Sequence[MicroBatch], stop: Callable[[], bool] | bool = False
    ) -> Tensor:
        r = self.recipe
        share = 1.0 / len(batches)  # each micro-batch's share of this process's rows
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            with self.parallel.accumulating(i == len(batches) - 1), self._precision():
                loss, parts = self_flow_loss(
                    self.student,
                    self.teacher if r.rep_weight > 0 else None,
                    batch.x0,
                    batch.y,
                    noise=batch.noise,
                    tau=batch.tau,
                    tau_teacher=batch.tau_teacher,
                    rep_weight=r.rep_weight,
                    student_layer=r.student_layer,
                    teacher_layer=r.teacher_layer,
                )
            (loss * share).backward()
            totals += torch.stack([loss.detach(), parts["flow"], parts["rep"]]).double() * share
        norm = torch.nn.utils.clip_grad_norm_(self.params, r.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        # asked as late as possible (a signal during this step's work still counts for it); a
        # fill, not a copy from the host: copying a Python number to the GPU would wait
        asked = stop() if callable(stop) else stop
        flag = torch.full((1,), float(asked), dtype=torch.float64, device=self.device)
        reduced = self.parallel.mean(torch.cat([totals, flag]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.parallel.release_gradients)
        self.parallel.after_update()
        update_ema(self.ema, self.model, r.ema_decay)
        norm = norm.detach().to(torch.float64).reshape(1)
        return torch.cat([reduced[:3], norm, reduced[3:]])

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


class SummaryReader:
    """Step summaries read back without stalling the device's queue.

    ``push(step, summary)`` starts an asynchronous copy into pinned memory behind the step's
    work; ``pop()`` returns ``(step, values)`` of the oldest pushed step, waiting for that step
    only (on CUDA, the next step is already queued behind it, so the GPU keeps working). On the
    CPU everything has already run and nothing waits.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, Tensor, torch.cuda.Event | None]] = []

    def push(self, step: int, summary: Tensor) -> None:
        event = None
        if summary.is_cuda:
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(summary.device))  # the copy's stream
        else:
            host = summary.detach().clone()
        self._pending.append((step, host, event))

    def __len__(self) -> int:
        return len(self._pending)

    def pop(self) -> tuple[int, dict[str, float]]:
        step, host, event = self._pending.pop(0)
        if event is not None:
            event.synchronize()
        return step, dict(zip(SUMMARY_FIELDS, host.tolist(), strict=True))
