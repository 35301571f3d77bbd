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
  :class:`~selfflow.base.errors.DatasetError` naming the file, both digests and the repair.
- **Once per run**, not once per start: :class:`ShardRecord` keeps what a run verified in its
  folder (``RUN/verified_shards/``), so a resume after preemption hashes only the shards that
  were rewritten since (or never verified), and under several processes each hashes its share
  and takes the others' from their records (it trusts the file system's metadata for files
  the run already hashed; see the class).
- **Before a run or on demand**, :func:`verify_all` hashes every shard (a few threads,
  a progress bar) and lists every problem: ``train --dry-run`` and ``prepare --verify DIR``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from selfflow.base.errors import DatasetError, SelfFlowError
from selfflow.base.files import file_sha256, replaced_atomically


class Shards(Protocol):
    """What verification needs of a dataset (a :class:`~selfflow.data.LatentDataset`; named
    here so that this module, which the dataset calls, does not depend on it in turn)."""

    root: Path
    manifest: dict[str, Any]
    identity: str

    @property
    def num_shards(self) -> int: ...

    def shard_path(self, shard_id: int) -> Path: ...

    def shard_file_problem(self, shard_id: int) -> str | None: ...

    def repair_hint(self) -> str: ...


# Threads hashing at once in verify_all (hashlib releases the GIL on large blocks); more only
# helps while the disk keeps up.
MAX_VERIFY_THREADS = 4

# The run folder's record of verified shards (ShardRecord): one file per process.
RECORD_DIR = "verified_shards"
RECORD_FORMAT = "selfflow-verified-shards"
RECORD_VERSION = 1

# What a shard's verification is tied to: size, st_mtime_ns, st_ctime_ns, inode.
Stat = tuple[int, int, int, int]
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "inode")


class _Stopped(Exception):
    """The background hash was stopped before it finished; the shard stays unverified."""


def shard_problem(
    dataset: Shards, shard_id: int, stop: threading.Event | None = None
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


def damaged_error(dataset: Shards, problems: list[str]) -> DatasetError:
    """One line: every problem found, then how to mend the dataset."""
    count = f"{len(problems)} of the {dataset.num_shards} shards of {dataset.root} failed: "
    return DatasetError(count + "; ".join(problems) + f". To mend it: {dataset.repair_hint()}")


def verify_all(dataset: Shards, *, progress: bool = False) -> list[str]:
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


def shard_stat(path: Path) -> Stat | None:
    """The metadata a recorded verification is tied to, or None when the file cannot be
    stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def record_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / RECORD_DIR / f"rank_{rank:05d}.json"


class ShardRecord:
    """What a training run verified, kept in its folder (``RUN/verified_shards/``) so that a
    resume, or another process of the run, does not hash it again.

    Each process keeps one file, ``rank_NNNNN.json``: for every shard it knows to be intact,
    the sha256 verified and the file's size, ``st_mtime_ns``, ``st_ctime_ns`` and inode as
    they were when it was hashed (taken before the hash and checked again after it). One
    writer per file, replaced atomically: a reader sees a whole file or the previous one, and
    no two processes ever write the same file. It is rewritten (a few tens of kB for
    ImageNet) by the verifier's background thread whenever shards were verified since the last
    write, and once more, flushed to the disk, when all are verified or the run ends: never on
    a step's path. A write that fails is noted once and costs only a later hash.

    **What it trusts.** A shard counts as verified without hashing when its size, mtime, ctime
    and inode now equal a record's and the manifest's sha256 is the one recorded: this trusts
    the file system's metadata for files this run already hashed. Any write to a shard changes
    its ctime (even when the mtime is set back), a copy or a replacement its inode, so a
    rewritten shard is hashed again. A bit that flips on the disk without a write keeps the
    metadata and is not seen here: ``selfflow prepare --verify`` and ``train --dry-run`` hash
    every shard whatever the record says. Nor would node-local copies that share every inode
    number and time with the copy that was hashed (a cloned disk image); copies made with
    ``cp`` or ``rsync`` get their own inodes and are hashed. A record of another data folder
    or dataset is not used; one that cannot be read is named in one line and ignored.

    **Sharing.** Under ``P`` processes the shards, in the order the run first reads them, are
    dealt out: process r hashes the shards at positions r, r + P, … first, then the others';
    before it hashes a shard dealt to another process it looks at that owner's record (one
    ``stat``; the file is read again only when it changed) and takes the shard from it when
    the metadata test above passes. Processes never wait for one another: a shard whose owner
    has not published it yet is hashed here too, which costs time, never correctness. At a
    start each process reads its own record and, when that lacks shards, rank 0's.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        dataset: Shards,
        rank: int = 0,
        world_size: int = 1,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = record_path(run_dir, rank)
        self.rank, self.world_size = rank, world_size
        self.log = log or (lambda message: None)
        self._run_dir = Path(run_dir)
        self._dataset = dataset
        self._ids = {dataset.shard_path(k).name: k for k in range(dataset.num_shards)}
        self._root = str(Path(dataset.root).resolve())
        self.entries: dict[int, dict[str, Any]] = {}  # shard id -> what was verified
        self._owner: dict[int, int] = {}
        self._read: dict[int, Any] = {}  # owner -> its record's stat when last read
        self._noted: set[Path] = set()
        self._lock = threading.Lock()  # entries and reads
        self._writing = threading.Lock()  # one write of the file at a time
        self._published, self._synced = 0, True
        self._write_failed = False

    def deal(self, order: list[int]) -> list[int]:
        """The order this process hashes in: its share of ``order`` first, then the rest."""
        self._owner = {k: i % self.world_size for i, k in enumerate(order)}
        mine = order[self.rank :: self.world_size]
        return mine + [k for k in order if self._owner[k] != self.rank]

    def load(self) -> set[int]:
        """The shards this process's record (or else rank 0's) vouches for."""
        self._merge(self.rank)
        if self.rank != 0 and len(self.entries) < self._dataset.num_shards:
            self._merge(0)
        return set(self.entries)

    def vouches(self, shard_id: int) -> bool:
        """Whether the record of the process this shard was dealt to (read again if it changed
        since it was last read) vouches for it."""
        if shard_id in self.entries:
            return True
        owner = self._owner.get(shard_id, self.rank)
        if owner == self.rank:
            return False
        self._merge(owner)
        return shard_id in self.entries

    def _merge(self, rank: int) -> None:
        """Take the entries of ``rank``'s record that pass the metadata test."""
        path = record_path(self._run_dir, rank)
        with self._lock:
            try:
                st = path.stat()
                seen = (st.st_size, st.st_mtime_ns, st.st_ino)
                if self._read.get(rank) == seen:  # unchanged since it was read
                    return
                self._read[rank] = seen
                found = self._entries_of(json.loads(path.read_bytes()))
            except FileNotFoundError:
                return
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
                if path not in self._noted:
                    self._noted.add(path)
                    reason = f"{type(error).__name__}: {error}"
                    self.log(f"note: ignoring {path} ({reason}); its shards are hashed as usual")
                return
            for shard_id, entry in found.items():
                stat = tuple(entry[key] for key in _STAT_KEYS)
                if shard_id not in self.entries and shard_stat(self._shard(shard_id)) == stat:
                    self.entries[shard_id] = entry

    def _entries_of(self, body: Any) -> dict[int, dict[str, Any]]:
        """A record's entries whose sha256 is the manifest's, by shard id (none for another
        data folder or dataset); raises on anything malformed."""
        if body.get("format") != RECORD_FORMAT or body.get("version") != RECORD_VERSION:
            raise ValueError(f"not a version-{RECORD_VERSION} record of verified shards")
        if body["data"] != self._root or body["dataset"] != self._dataset.identity:
            return {}
        found = {}
        for name, entry in body["shards"].items():
            values = [entry[key] for key in _STAT_KEYS]
            if not all(type(v) is int for v in values) or not isinstance(entry["sha256"], str):
                raise ValueError(f"the entry of {name} is malformed")
            shard_id = self._ids.get(name)
            if shard_id is not None and entry["sha256"] == self._sha256(shard_id):
                found[shard_id] = {key: entry[key] for key in ("sha256", *_STAT_KEYS)}
        return found

    def stat(self, shard_id: int) -> Stat | None:
        return shard_stat(self._shard(shard_id))

    def add(self, shard_id: int, before: Stat | None) -> None:
        """Record a shard this process found intact, if its metadata (``before``: taken before
        the hash) did not change while it was hashed; else the next start hashes it again."""
        if before is None or self.stat(shard_id) != before:
            return
        with self._lock:
            self.entries[shard_id] = {
                "sha256": self._sha256(shard_id),
                **dict(zip(_STAT_KEYS, before, strict=True)),
            }

    def publish(self, final: bool = False) -> None:
        """Write this process's record if it grew since the last write; ``final``: flushed to
        the disk before the rename (the run's end; a torn record left by a crash before that
        is only ignored). A failed write is noted once, never raised."""
        with self._writing:
            with self._lock:
                count = len(self.entries)
                if count == self._published and (self._synced or not final):
                    return
                shards = {self._shard(k).name: dict(self.entries[k]) for k in sorted(self.entries)}
            body = {
                "format": RECORD_FORMAT,
                "version": RECORD_VERSION,
                "data": self._root,
                "dataset": self._dataset.identity,
                "rank": self.rank,
                "shards": shards,
            }
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with replaced_atomically(self.path, fsync=final) as tmp:
                    tmp.write_text(json.dumps(body, indent=1))
            except (OSError, SelfFlowError) as error:
                if not self._write_failed:
                    self._write_failed = True
                    self.log(f"note: could not record the verified shards ({error}); a resume "
                             f"hashes them again")  # fmt: skip
                return
            self._published, self._synced = count, final

    def _shard(self, shard_id: int) -> Path:
        return self._dataset.shard_path(shard_id)

    def _sha256(self, shard_id: int) -> str:
        return self._dataset.manifest["shards"][shard_id]["sha256"]


class ShardVerifier:
    """Hashes shards on a background thread; :meth:`require` makes a reader wait for (or do)
    a shard's check. ``good`` is the set of verified shard ids (read without the lock: a set's
    membership test is atomic, and a shard never leaves it). With a ``record``
    (:class:`ShardRecord`) the shards it vouches for start out verified, and those hashed
    here are added to it."""

    def __init__(
        self, dataset: Shards, order: Iterable[int], record: ShardRecord | None = None
    ) -> None:
        self._dataset = dataset
        self._record = record
        self.good: set[int] = set()
        self._busy: set[int] = set()
        self._failed: dict[int, str] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.seconds = 0.0  # spent hashing, on any thread
        self.hashed = 0  # shards hashed to the end, on any thread
        order = list(order)
        if record is not None:
            order = record.deal(order)
            self.good.update(record.load())
            if self.good:
                record.log(
                    f"{len(self.good)} of the {dataset.num_shards} shards were verified by an "
                    f"earlier start of this run and are unchanged since: not hashed again"
                )
        rank = 0 if record is None else record.rank
        self._thread = threading.Thread(
            target=self._run, args=(order,), name=f"selfflow-verify-{rank}", daemon=True
        )
        self._thread.start()

    def _run(self, order: list[int]) -> None:
        for shard_id in order:
            if self._stop.is_set():
                return
            if self._record is not None:  # what this process verified so far, for its peers
                self._record.publish()
            if self._vouched(shard_id):
                continue
            with self._changed:
                if shard_id in self.good or shard_id in self._failed or shard_id in self._busy:
                    continue
                self._busy.add(shard_id)
            self._hash(shard_id, self._stop)
        with self._changed:  # the shards readers are still hashing, then one last write
            while self._busy and not self._stop.is_set():
                self._changed.wait(timeout=1.0)
        if self._record is not None:
            self._record.publish(final=True)

    def _vouched(self, shard_id: int) -> bool:
        """Whether the record of the process this shard was dealt to vouches for it (then it
        counts as verified here too)."""
        if self._record is None or shard_id in self.good or not self._record.vouches(shard_id):
            return False
        with self._changed:
            if shard_id not in self._failed:
                self.good.add(shard_id)
                self._changed.notify_all()
        return True

    def _hash(self, shard_id: int, stop: threading.Event | None) -> None:
        """Check one shard this thread claimed (in ``_busy``) and record the outcome."""
        began = time.perf_counter()
        before = self._record.stat(shard_id) if self._record is not None else None
        outcome: str | None | _Stopped
        try:
            outcome = shard_problem(self._dataset, shard_id, stop)
        except _Stopped:
            outcome = _Stopped()
        except BaseException as error:  # never leave a claimed shard for others to wait on
            outcome = f"shard {self._dataset.shard_path(shard_id)} could not be checked ({error})"
        if outcome is None and self._record is not None:
            self._record.add(shard_id, before)
        with self._changed:
            self.seconds += time.perf_counter() - began
            self.hashed += not isinstance(outcome, _Stopped)
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
        unverified = [k for k in dict.fromkeys(int(k) for k in shard_ids) if k not in self.good]
        missing = [k for k in unverified if not self._vouched(k)]
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
        """Stop the background hashing; write the record with everything verified so far."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self._record is not None:
            self._record.publish(final=True)


def verify_report(dataset: Shards, *, progress: bool, log: Callable[[str], None]) -> list[str]:
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
