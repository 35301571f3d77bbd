"""What checking shards against the manifest's sha256 costs: hashing speed, and a training run's
step times with the background verification on and off.

1. sha256 of ImageNet-sized shard files (4096 SD-VAE posteriors, 128 MiB each, in the page
   cache) with ``selfflow.base.files.file_sha256``, one file at a time on one thread; then
   ``verify_all`` (what ``train --dry-run`` and ``prepare --verify`` run) on 1 and 2 threads.
   What that means for ImageNet's 41.98 GB (313 shards) follows from the one-thread rate.
2. The same tiny training run (``--model tiny`` on the same 4 × 32 × 32 data, ``--batch``) with
   :meth:`LatentDataset.start_verifying` as the trainer calls it, and with it replaced by a
   no-op: the first step (which waits for the shards it reads to be hashed) and the median of
   the later steps, from ``log.jsonl`` (one line per step).
3. A run's record of verified shards (``RUN/verified_shards/``): the verification of a first
   start and of a resume of the same run (one process), started as the trainer starts it (the
   run's read order, then its first 256 images read as one batch): seconds until that batch
   is read, seconds until every shard is verified, shards hashed. Then two verifiers of one
   first start as ranks 0 and 1 of 2 (two threads of this process, sharing through their
   records): the shards each hashed.

    python benchmarks/shard_verify.py --shards 4 --steps 40
    python benchmarks/shard_verify.py --record-only --shards 8 --shard-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.base.files import file_sha256
from selfflow.data import LatentDataset, write_dataset
from selfflow.data import verify as verify_module
from selfflow.data.verify import ShardRecord
from selfflow.train.config import TrainConfig
from selfflow.train.trainer import train

IMAGENET_BYTES = 41.98e9  # 313 float32 shards (docs/data.md)
SHARD = 4096


def make_dataset(folder: Path, shards: int, shard_size: int = SHARD) -> LatentDataset:
    rng = np.random.default_rng(0)
    n = shards * shard_size
    means = rng.standard_normal((n, 4, 32, 32), dtype=np.float32)
    stds = np.abs(rng.standard_normal((n, 4, 32, 32), dtype=np.float32)) * 0.1
    write_dataset(folder, means, np.arange(n) % 10, stds=stds, shard_size=shard_size)
    return LatentDataset(folder)


def wait_done(verifiers: list) -> None:
    while not all(v.done for v in verifiers):
        time.sleep(0.001)


def record_starts(data: Path, run: Path, batch: int) -> list[tuple[str, float, float, str]]:
    """(start, first batch s, every shard verified s, shards hashed): a first start and a
    resume of one run, then a first start of a 2-process run (another run folder)."""
    rows = []
    order = np.random.default_rng(3).permutation(len(LatentDataset(data)))
    for label in ("first start", "resume"):
        ds = LatentDataset(data)
        began = time.perf_counter()
        verifier = ds.start_verifying(order, ShardRecord(run, ds))
        ds.get_batch(order[:batch])
        first = time.perf_counter() - began
        wait_done([verifier])
        total = time.perf_counter() - began
        ds.stop_verifying()
        rows.append((label, first, total, f"{verifier.hashed} of {ds.num_shards}"))
    sets = [LatentDataset(data) for _ in range(2)]
    began = time.perf_counter()
    verifiers = [
        ds.start_verifying(order, ShardRecord(run.with_name("two"), ds, rank, 2))
        for rank, ds in enumerate(sets)
    ]
    wait_done(verifiers)
    total = time.perf_counter() - began
    for ds in sets:
        ds.stop_verifying()
    hashed = " and ".join(str(v.hashed) for v in verifiers)
    rows.append(
        (
            "first start, ranks 0 and 1 of 2",
            float("nan"),
            total,
            f"{hashed} of {sets[0].num_shards}",
        )
    )
    return rows


def print_record_starts(data: Path, run: Path, batch: int, rounds: int) -> None:
    print(
        f"| start (record in the run folder) | first batch of {batch} read | every shard "
        f"verified | shards hashed |"
    )
    print("|---|---|---|---|")
    for round_ in range(rounds):
        for label, first, total, hashed in record_starts(data, run / f"r{round_}" / "run", batch):
            first_text = "—" if first != first else f"{first:.2f} s"
            print(f"| {label} | {first_text} | {total:.2f} s | {hashed} |")


def memory_rate(rounds: int) -> list[float]:
    """MB/s of hashlib's sha256 over a 128 MiB buffer in memory: the CPU's ceiling."""
    import hashlib

    block = np.random.default_rng(1).bytes(1 << 27)
    rates = []
    for _ in range(rounds):
        began = time.perf_counter()
        hashlib.sha256(block).hexdigest()
        rates.append(len(block) / 1e6 / (time.perf_counter() - began))
    return rates


def hash_rate(ds: LatentDataset, rounds: int) -> list[float]:
    """MB/s of file_sha256 over every shard, one file after another, per round."""
    paths = [ds.shard_path(k) for k in range(ds.num_shards)]
    size = sum(p.stat().st_size for p in paths)
    rates = []
    for _ in range(rounds):
        began = time.perf_counter()
        for path in paths:
            file_sha256(path)
        rates.append(size / 1e6 / (time.perf_counter() - began))
    return rates


def verify_all_rate(ds: LatentDataset, threads: int, rounds: int) -> list[float]:
    size = sum(ds.shard_path(k).stat().st_size for k in range(ds.num_shards))
    verify_module.MAX_VERIFY_THREADS = threads
    rates = []
    for _ in range(rounds):
        began = time.perf_counter()
        assert verify_module.verify_all(ds) == []
        rates.append(size / 1e6 / (time.perf_counter() - began))
    return rates


def read_times(ds: LatentDataset, batch: int, rounds: int = 5, repeats: int = 50) -> list[float]:
    """Best seconds per ``get_batch`` of ``batch`` random indices: without verification, then
    with every shard already verified (what each read pays after the first touch)."""
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, len(ds), batch) for _ in range(repeats)]
    best = []
    for verified in (False, True):
        if verified:
            verifier = ds.start_verifying()
            for k in range(ds.num_shards):
                verifier.require(k)
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            for indices in batches:
                ds.get_batch(indices)
            times.append((time.perf_counter() - began) / repeats)
        best.append(min(times))
    ds.stop_verifying()
    return best


def step_times(
    data: Path, out: Path, steps: int, verify: bool, batch: int
) -> tuple[float, float, float]:
    """(first step s, median later step s, seconds spent hashing) of one tiny run."""
    started = []
    original = LatentDataset.start_verifying

    def spy(self, indices=None, record=None):
        started.append(original(self, indices, record))
        return started[-1]

    LatentDataset.start_verifying = spy if verify else (lambda self, *args: None)
    try:
        config = TrainConfig(
            data=str(data), output_dir=str(out), steps=steps, model="tiny",
            global_batch_size=batch, checkpoint_every=steps, sample_every=0, log_every=1,
            progress=False, device="cpu", dtype="float32",
        )  # fmt: skip
        train(config, log=lambda message: None)
    finally:
        LatentDataset.start_verifying = original
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = [1.0 / r["steps_per_s"] for r in records if "steps_per_s" in r]
    hashing = started[0].seconds if started else 0.0
    return seconds[0], statistics.median(seconds[5:]), hashing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=4, help="shards of 4096 images (128 MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="global batch of the tiny run")
    parser.add_argument("--shard-size", type=int, default=SHARD, help="images per shard")
    parser.add_argument(
        "--record-only", action="store_true", help="only part 3: first start against resume"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    print(
        f"# shard_verify: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, numpy {np.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "ds", args.shards, args.shard_size)
        size = sum(ds.shard_path(k).stat().st_size for k in range(ds.num_shards))
        print(f"\n{ds.num_shards} shards, {size / 1e6:.1f} MB, in the page cache\n")
        if args.record_only:
            print_record_starts(Path(tmp) / "ds", Path(tmp), 256, args.rounds)
            return
        print("| how | MB/s per round | best |")
        print("|---|---|---|")
        rows = [("hashlib, 128 MiB in memory (the CPU's ceiling)", memory_rate(args.rounds))]
        rows.append(("file_sha256 over the shards, one thread", hash_rate(ds, args.rounds)))
        for threads in (1, 2):
            rows.append(
                (f"verify_all, {threads} thread(s)", verify_all_rate(ds, threads, args.rounds))
            )
        for how, rates in rows:
            print(f"| {how} | {', '.join(f'{r:.0f}' for r in rates)} | {max(rates):.0f} |")
        best = max(rows[1][1])
        print(
            f"\nImageNet's {IMAGENET_BYTES / 1e9:.2f} GB at the best one-thread file rate "
            f"{best:.0f} MB/s: {IMAGENET_BYTES / 1e6 / best:.0f} s of one core (files in "
            f"the page cache; from a disk, at most the disk's read rate)\n"
        )
        plain, verified = read_times(ds, 256)
        print("| get_batch of 256 random images (best of 5 × 50) | seconds |")
        print("|---|---|")
        print(f"| no verification | {plain * 1e3:.2f} ms |")
        print(f"| every shard verified | {verified * 1e3:.2f} ms |\n")
        print(
            f"| tiny run, batch {args.batch}, {args.steps} steps | first step "
            f"| median of steps 6+ | hashing, summed over threads |"
        )
        print("|---|---|---|---|")
        step_times(Path(tmp) / "ds", Path(tmp) / "warm-up", 8, False, args.batch)  # imports
        for verify in (False, True, False, True):
            first, later, hashing = step_times(
                Path(tmp) / "ds",
                Path(tmp) / f"run-{time.monotonic_ns()}",
                args.steps,
                verify,
                args.batch,
            )
            print(
                f"| verification {'on ' if verify else 'off'} | {first * 1e3:.1f} ms "
                f"| {later * 1e3:.1f} ms | {hashing:.2f} s |"
            )
        print()
        print_record_starts(Path(tmp) / "ds", Path(tmp), 256, args.rounds)


if __name__ == "__main__":
    main()
