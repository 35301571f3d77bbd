"""The FID batch's progress bar (rank 0): one bar over all N images.

Rank 0 counts its own images as they are decoded and the other ranks' as their shard files
appear, so the bar needs no messages between processes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from selfflow.base.errors import ConfigurationError
from selfflow.batch import store

STEP_PROGRESS_AFTER = 10.0  # seconds into a batch before the bar shows the batch's step count


class BatchProgress:
    """One bar over all N images: this rank's as decoded, the others' as their shards land."""

    def __init__(self, job: Any, pending: list[int], mine: set[int], done_before: int) -> None:
        self.job = job
        self.enabled = job.context.is_main
        self.others = {k for k in pending if k not in mine} if self.enabled else set()
        world = job.context.world_size
        self.owner = {k: j % world for j, k in enumerate(pending)}  # as distributed.assign
        self._own = 0
        self._shown = 0
        self._batch_started = time.monotonic()
        self._step_shown: float | None = None
        self._lock = threading.Lock()
        self.bar = progress_bar(job.progress, job.plan.num_samples, "sampling", initial=done_before)

    def start_batch(self) -> None:
        self._batch_started = time.monotonic()
        self._step_shown = None

    def on_step(self, done: int, total: int) -> None:
        """The step counter of the batch being sampled, once a batch takes long.

        The bar counts images as they are decoded, so with XL/2 on a CPU, or large batches,
        it stands still for minutes; after ``STEP_PROGRESS_AFTER`` seconds into a batch its
        step count is shown next to the bar (at most twice a second).
        """
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self._batch_started < STEP_PROGRESS_AFTER:
            return
        if self._step_shown is None or now - self._step_shown >= 0.5 or done == total:
            self._step_shown = now
            self.bar.set_postfix_str(f"batch at step {done}/{total}")

    def add_own(self, count: int) -> None:
        with self._lock:
            self._own += count

    def poll(self) -> None:
        if not self.enabled:
            return
        if self.others:
            landed = {s.id for s in store.existing_shards(self.job.output_dir, self.job.plan)}
            arrived = self.others & landed
            self.others -= arrived
            with self._lock:
                self._own += sum(self.job.plan.shard(k).size for k in arrived)
        with self._lock:
            delta, self._shown = self._own - self._shown, self._own
        if self.bar is not None and delta:
            self.bar.update(delta)

    def describe_missing(self) -> str:
        self.poll()
        if not self.others:
            return "every shard was written"
        by_rank: dict[int, list[int]] = {}
        for shard_id in sorted(self.others):
            by_rank.setdefault(self.owner[shard_id], []).append(shard_id)
        return "; ".join(
            f"rank {rank} did not write shards {', '.join(map(str, ids))}"
            for rank, ids in sorted(by_rank.items())
        )

    def wait_for_others(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """After every process has finished: wait until their shard files are visible here.

        On a network filesystem a file written on another node may take a moment to appear
        in a listing on this one; far longer means the folder is not what the others wrote to.
        """
        deadline = time.monotonic() + timeout
        self.poll()
        while self.others:
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"every process finished, but after {timeout:.0f} s {self.job.output_dir} "
                    f"still lacks their shards ({self.describe_missing()}); --output-dir must be "
                    f"on a filesystem all nodes share"
                )
            time.sleep(interval)
            self.poll()

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0):
    """A tqdm bar counting images (rate and ETA), or None when progress is off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="img", smoothing=0.05, dynamic_ncols=True
    )
