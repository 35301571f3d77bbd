"""The global batch of step k as a function of (seed, step) and the dataset alone.

Every random number of a training step comes from a CPU stream keyed by
``(seed, step, purpose)`` (:func:`selfflow.base.seeds.keyed_rng`: Philox under a 128-bit key, so no
two steps or purposes share a stream), never from a rank, a worker or a generator's history:

- **which images** (``"train-order"``, keyed by the *epoch*, not the step): the run visits the
  dataset in a seeded permutation per epoch; position ``p = step·G + j`` of the stream (``G``
  the global batch) is image ``perm_{p // N}[p % N]``. Each image is seen once per epoch, and
  a batch that straddles two epochs takes the end of one permutation and the start of the next;
- **posterior draws** (``"posterior/b"``, per block ``b`` of :data:`ROW_BLOCK` rows): float32
  standard normals ``n`` for ``mean + std·n``;
- **times and masks** (``"times"``): float32 ``U[0, 1)`` in the order ``t (G,)``, ``s (G,)``,
  ``u (G, T)``, turned into per-token times by
  :func:`selfflow.train.objective.dual_timesteps_from`;
- **path noise** (``"noise/b"``, per block as above): the ``ε`` of ``x_τ = (1 − τ)·x0 + τ·ε``;
- **label drops** (``"label-drop"``): ``U[0, 1) < p`` per sample.

Every process draws the small per-step numbers of the whole global batch (times, masks, drops)
and the blocks of the large per-row ones (about 2 M float32 normals for ImageNet's batch of 256,
tens of milliseconds on one CPU core) that hold its own rows, so any process count and any
accumulation split see the same numbers while the large draws shrink with the process count,
and a resumed run needs no RNG state: the step number is the whole state. The draws are made on
a background thread one step ahead (:class:`Prefetcher`), together with the reads from the
memory-mapped dataset. Any change to these draws raises
:data:`selfflow.train.config.STREAMS_REVISION`, so a run begun under other draws is not resumed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from selfflow.base.seeds import keyed_rng, normals, uniforms
from selfflow.train.objective import dual_timesteps_from

if TYPE_CHECKING:
    from selfflow.data import LatentDataset
    from selfflow.train.config import ResolvedConfig


class DataOrder:
    """Dataset indices of stream positions: a seeded permutation per epoch.

    The last two epochs' permutations are cached (a batch touches at most two); a permutation
    of ImageNet's 1.28 M images takes about 30 ms.
    """

    def __init__(self, seed: int, size: int) -> None:
        if size < 1:
            raise ValueError("the dataset is empty")
        self.seed, self.size = int(seed), int(size)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            perm = keyed_rng(self.seed, epoch, "train-order").permutation(self.size)
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = perm
        return perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices of stream positions ``start … start + count − 1``."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.size
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.permutation(int(epoch))[positions[here] % self.size]
        return out


@dataclass(frozen=True)
class StepDraws:
    """The random numbers of a step's global batch (or of some of its rows), on the CPU."""

    step: int
    indices: np.ndarray  # (n,) dataset indices
    posterior: torch.Tensor | None  # (n, C, H, W) normals for mean + std·n; None without stds
    noise: torch.Tensor  # (n, C, H, W) the path's ε
    tau: torch.Tensor  # (n, T) per-token paper time
    tau_teacher: torch.Tensor  # (n,) min(t, s)
    drop: torch.Tensor  # (n,) bool: label replaced by the null class

    def rows(self, start: int, stop: int) -> StepDraws:
        return replace(
            self,
            indices=self.indices[start:stop],
            posterior=None if self.posterior is None else self.posterior[start:stop],
            noise=self.noise[start:stop],
            tau=self.tau[start:stop],
            tau_teacher=self.tau_teacher[start:stop],
            drop=self.drop[start:stop],
        )


@dataclass(frozen=True)
class StreamSpec:
    """What the draws of a step depend on besides (seed, step)."""

    seed: int
    global_batch: int
    latent_shape: tuple[int, int, int]
    num_tokens: int
    mask_ratio: float
    label_dropout: float
    has_std: bool


def run_streams(resolved: ResolvedConfig, dataset: LatentDataset) -> tuple[StreamSpec, DataOrder]:
    """The stream spec and data order of a run: derived here once, for the trainer and the
    benchmarks that reproduce its batches."""
    s, m = resolved.settings, resolved.model
    spec = StreamSpec(
        seed=s.seed,
        global_batch=s.global_batch_size,
        latent_shape=tuple(dataset.latent_shape),
        num_tokens=m.num_tokens,
        mask_ratio=s.mask_ratio,
        label_dropout=s.label_dropout,
        has_std=bool(dataset.has_std),
    )
    return spec, DataOrder(s.seed, len(dataset))


ROW_BLOCK = 16
"""Rows per keyed block of the per-row tensors (posterior draws, path noise): a process draws
only the blocks that hold its rows, so the largest draws shrink with the process count, while
one block's numbers never depend on how the batch is split (about 0.1 ms per block to key)."""


def _row_normals(spec: StreamSpec, step: int, purpose: str, start: int, stop: int) -> torch.Tensor:
    """Standard normals of rows ``start … stop − 1`` of step ``step``'s ``(G, C, H, W)`` tensor:
    block ``b`` (rows ``16b …``) is drawn from the stream ``purpose/b``."""
    g = spec.global_batch
    first, last = start // ROW_BLOCK, (stop - 1) // ROW_BLOCK
    blocks = [
        normals(
            keyed_rng(spec.seed, step, f"{purpose}/{b}"),
            (min(ROW_BLOCK, g - b * ROW_BLOCK), *spec.latent_shape),
        )
        for b in range(first, last + 1)
    ]
    offset = first * ROW_BLOCK
    return torch.cat(blocks)[start - offset : stop - offset]


def draw_step(
    spec: StreamSpec, order: DataOrder, step: int, rows: tuple[int, int] | None = None
) -> StepDraws:
    """The random numbers of step ``step``: of its whole global batch, or of ``rows``
    (``(start, stop)``, a process's share: :func:`process_range`), which are the same numbers
    as those rows of the whole batch."""
    g = spec.global_batch
    start, stop = rows if rows is not None else (0, g)
    posterior = None
    if spec.has_std:
        posterior = _row_normals(spec, step, "posterior", start, stop)
    times = keyed_rng(spec.seed, step, "times")
    t, s = uniforms(times, g), uniforms(times, g)
    u = uniforms(times, (g, spec.num_tokens))
    tau, tau_teacher = dual_timesteps_from(t, s, u, mask_ratio=spec.mask_ratio)
    noise = _row_normals(spec, step, "noise", start, stop)
    drop = uniforms(keyed_rng(spec.seed, step, "label-drop"), g)
    return StepDraws(
        step=step,
        indices=order.indices(step * g + start, stop - start),
        posterior=posterior,
        noise=noise,
        tau=tau[start:stop],
        tau_teacher=tau_teacher[start:stop],
        drop=(drop < spec.label_dropout)[start:stop],
    )


@dataclass
class MicroBatch:
    """One forward/backward's inputs: clean latents, labels (dropped ones already null)."""

    x0: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor
    tau: torch.Tensor
    tau_teacher: torch.Tensor

    def to(self, device: torch.device) -> MicroBatch:
        move = {"device": device, "non_blocking": True}
        return MicroBatch(
            self.x0.to(**move),
            self.y.to(**move),
            self.noise.to(**move),
            self.tau.to(**move),
            self.tau_teacher.to(**move),
        )


def materialise(draws: StepDraws, dataset, null_class: int) -> MicroBatch:
    """Read the rows' images and apply the draws: ``x0 = scale·(mean + std·n)`` (with the
    dataset's latent convention: shift and per-channel statistics too).

    A dataset stored without stds is used as it is (``scale·mean``; the scale of such data is
    1.0). Labels drawn for dropping become ``null_class``, for student and teacher alike.
    """
    means, stds, labels = dataset.get_batch(draws.indices)
    x0 = torch.as_tensor(means, dtype=torch.float32)
    if draws.posterior is not None and stds is not None:
        x0 = x0 + torch.as_tensor(stds, dtype=torch.float32) * draws.posterior
    x0 = dataset.latent.normalise(x0)  # (z - shift) · scale, then any per-channel statistics
    y = torch.as_tensor(labels, dtype=torch.int64)
    y = torch.where(draws.drop, torch.full_like(y, null_class), y)
    return MicroBatch(x0, y, draws.noise, draws.tau, draws.tau_teacher)


def process_range(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``(start, stop)`` of the global batch's rows."""
    per = global_batch // world_size
    return rank * per, (rank + 1) * per


def process_rows(draws: StepDraws, rank: int, world_size: int) -> StepDraws:
    """Rank ``rank``'s contiguous share of the global batch."""
    return draws.rows(*process_range(len(draws.indices), rank, world_size))


def micro_batches(draws: StepDraws, size: int) -> list[StepDraws]:
    return [draws.rows(k, k + size) for k in range(0, len(draws.indices), size)]


class Prefetcher:
    """Prepares step ``k + 1``'s micro-batches on a thread while step ``k`` trains.

    ``make(step)`` returns the step's list of :class:`MicroBatch` (CPU tensors, pinned when
    training on CUDA). An exception in the thread is raised again by :meth:`get`. ``waited``
    adds up the seconds :meth:`get` blocked: when it grows, the data cannot keep up.
    """

    def __init__(self, make: Callable[[int], list[MicroBatch]], first: int, last: int) -> None:
        self._make = make
        self.waited = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(first, last), name="selfflow-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last):
            try:
                item = (step, self._make(step), None)
            except BaseException as error:  # handed to the training thread
                item = (step, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> list[MicroBatch]:
        began = time.perf_counter()
        got, batches, error = self._queue.get()
        self.waited += time.perf_counter() - began
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: expected step {step}, got {got}")
        return batches

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
