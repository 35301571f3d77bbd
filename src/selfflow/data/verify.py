"""Shard contents against the manifest's sha256: once per shard, before any row of it is used.

The manifest records every shard's sha256 when ``selfflow prepare`` (or ``write_dataset``)
writes it; a flipped byte on a disk, a partial copy or an edited file shows as another digest.
Hashing ImageNet's 42 GB took one core of a busy 2-core CPU 82–123 s (see
``benchmarks/results/2026-12-06-cpu/shard_verify.md``), too long to put before every start, so:

- **While training**, :class:`ShardVerifier` (started by
  :meth:`~selfflow.data.LatentDataset.start_verifying`) hashes the shards on a background
  thread in the order the run first reads them; a batch that needs shards not yet verified
  hashes them on the reading thread and a few helpers (the trainer's prefetch thread, one
  step ahead of the device; a run's first batches, which read from most shards, wait for
  them). No row of a shard is returned before its digest matched; a mismatch raises
  :class:`~selfflow.errors.DatasetError` naming the file, both digests and the repair. Each
  training process verifies the shards it reads (every rank reads from every shard).
- **Before a run or on demand**, :func:`verify_all` hashes every shard (a few threads,
  a progress bar) and lists every problem: ``train --dry-run`` and ``prepare --verify DIR``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from selfflow.errors import DatasetError
from selfflow.files import file_sha256

if TYPE_CHECKING:
    from selfflow.data.dataset import LatentDataset

# Threads hashing at once in verify_all (hashlib releases the GIL on large blocks); more only
# helps while the disk keeps up.
MAX_VERIFY_THREADS = 4


class _Stopped(Exception):
    """The background hash was stopped before it finished; the shard stays unverified."""


def shard_problem(
    dataset: LatentDataset, shard_id: int, stop: threading.Event | None = None
) -> str | None:
    """What is wrong with one shard (missing, wrong size, or a sha256 other than the
    manifest's), or None when it is intact. Reads the whole file."""
    problem = dataset.shard_file_problem(shard_id)
    if problem is not None:
        return problem
    path = dataset.shard_path(shard_id)
    try:
        found = file_sha256(path, stop=stop)
    except OSError as error:
        return f"shard {path} is unreadable ({error})"
    if found is None:
        raise _Stopped
    expected = dataset.manifest["shards"][shard_id]["sha256"]
    if found != expected:
        return (
            f"shard {path} is damaged: its sha256 begins {found[:12]} where the manifest says "
            f"{expected[:12]}"
        )
    return None


def damaged_error(dataset: LatentDataset, problems: list[str]) -> DatasetError:
    """One line: every problem found, then how to mend the dataset."""
    count = f"{len(problems)} of the {dataset.num_shards} shards of {dataset.root} failed: "
    return DatasetError(count + "; ".join(problems) + f". To mend it: {dataset.repair_hint()}")


def verify_all(dataset: LatentDataset, *, progress: bool = False) -> list[str]:
    """Hash every shard against the manifest (a few threads); returns every problem found, in
    shard order (empty when the dataset is intact). ``progress``: a tqdm bar in bytes."""
    sizes = []
    for k in range(dataset.num_shards):
        try:
            sizes.append(dataset.shard_path(k).stat().st_size)
        except OSError:
            sizes.append(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(sizes), desc="verifying shards", unit="B", unit_scale=True, leave=False
        )
    lock = threading.Lock()

    def check(shard_id: int) -> str | None:
        problem = shard_problem(dataset, shard_id)
        if bar is not None:
            with lock:
                bar.update(sizes[shard_id])
        return problem

    threads = max(1, min(MAX_VERIFY_THREADS, os.cpu_count() or 1, dataset.num_shards))
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="selfflow-verify") as pool:
            found = list(pool.map(check, range(dataset.num_shards)))
    finally:
        if bar is not None:
            bar.close()
    return [problem for problem in found if problem is not None]


class ShardVerifier:
    """Hashes shards on a background thread; :meth:`require` makes a reader wait for (or do)
    a shard's check. ``good`` is the set of verified shard ids (read without the lock: a set's
    membership test is atomic, and a shard never leaves it)."""

    def __init__(self, dataset: LatentDataset, order: Iterable[int]) -> None:
        self._dataset = dataset
        self.good: set[int] = set()
        self._busy: set[int] = set()
        self._failed: dict[int, str] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.seconds = 0.0  # spent hashing, on any thread
        self._thread = threading.Thread(
            target=self._run, args=(list(order),), name="selfflow-verify", daemon=True
        )
        self._thread.start()

    def _run(self, order: list[int]) -> None:
        for shard_id in order:
            if self._stop.is_set():
                return
            with self._changed:
                if shard_id in self.good or shard_id in self._failed or shard_id in self._busy:
                    continue
                self._busy.add(shard_id)
            self._hash(shard_id, self._stop)

    def _hash(self, shard_id: int, stop: threading.Event | None) -> None:
        """Check one shard this thread claimed (in ``_busy``) and record the outcome."""
        began = time.perf_counter()
        outcome: str | None | _Stopped
        try:
            outcome = shard_problem(self._dataset, shard_id, stop)
        except _Stopped:
            outcome = _Stopped()
        except BaseException as error:  # never leave a claimed shard for others to wait on
            outcome = f"shard {self._dataset.shard_path(shard_id)} could not be checked ({error})"
        with self._changed:
            self.seconds += time.perf_counter() - began
            self._busy.discard(shard_id)
            if outcome is None:
                self.good.add(shard_id)
            elif isinstance(outcome, str):
                self._failed[shard_id] = outcome
            self._changed.notify_all()

    def require(self, shard_id: int) -> None:
        """Return once ``shard_id`` is verified, hashing it here if no thread is at it;
        raise :class:`DatasetError` if it is damaged."""
        with self._changed:
            while True:
                if shard_id in self.good:
                    return
                if shard_id in self._failed:
                    raise damaged_error(self._dataset, [self._failed[shard_id]])
                if shard_id not in self._busy:
                    self._busy.add(shard_id)
                    break
                self._changed.wait()
        self._hash(shard_id, None)  # a reader's own check is never stopped half-way
        self.require(shard_id)

    def require_all(self, shard_ids: Iterable[int]) -> None:
        """:meth:`require` for the shards of one batch: those no thread is at are hashed side
        by side (up to ``MAX_VERIFY_THREADS``), so a run's first batches, which read from most
        shards, wait for a few cores' hashing rather than one's."""
        missing = [k for k in dict.fromkeys(int(k) for k in shard_ids) if k not in self.good]
        with self._changed:
            mine = [k for k in missing if k not in self._busy and k not in self._failed]
            self._busy.update(mine)
        if len(mine) > 1:
            threads = min(MAX_VERIFY_THREADS, os.cpu_count() or 1, len(mine))
            with ThreadPoolExecutor(threads, thread_name_prefix="selfflow-verify") as pool:
                list(pool.map(lambda k: self._hash(k, None), mine))
        elif mine:
            self._hash(mine[0], None)
        for shard_id in missing:
            self.require(shard_id)

    def check(self) -> None:
        """Raise for a damaged shard found so far (by shard order), if any."""
        if self._failed:
            with self._changed:
                first = min(self._failed)
                raise damaged_error(self._dataset, [self._failed[first]])

    @property
    def done(self) -> bool:
        """Every shard checked (intact or not)."""
        return len(self.good) + len(self._failed) == self._dataset.num_shards

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def verify_report(
    dataset: LatentDataset, *, progress: bool, log: Callable[[str], None]
) -> list[str]:
    """Hash every shard (``train --dry-run``); ``log`` the verdict and return the failure,
    if any, for the dry run's last line."""
    began = time.perf_counter()
    problems = verify_all(dataset, progress=progress)
    if problems:
        return [str(damaged_error(dataset, problems))]
    size = sum(dataset.shard_path(k).stat().st_size for k in range(dataset.num_shards))
    log(
        f"the {dataset.num_shards} shards ({size / 1e9:.2f} GB) match the manifest's "
        f"sha256 (checked in {time.perf_counter() - began:.1f} s)"
    )
    return []
