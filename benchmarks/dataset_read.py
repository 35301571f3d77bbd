"""Random-batch reads from a LatentDataset: ``get_batch`` against indexing one image at a time.

Writes a synthetic dataset of SD-VAE-shaped posteriors (``(4, 32, 32)`` mean and std per image,
float32, shards of 4096) and times random global batches, as the trainer draws them each step,
once the files are in the page cache (a training run reads each shard many times). Both
ways end with batch tensors; allocating them (page faults on fresh memory) is a large part of
the cost on a virtual machine.

    python benchmarks/dataset_read.py --images 32768 --batch 256
"""

from __future__ import annotations

import argparse
import os
import platform
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

from selfflow.data import LatentDataset, write_dataset


def seconds_per_call(function, batches: list[np.ndarray], rounds: int = 5) -> float:
    """Best of ``rounds`` passes over ``batches`` (the first pass also warms the page cache)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for batch in batches:
            function(batch)
        best = min(best, (time.perf_counter() - start) / len(batches))
    return best


def stacked(ds: LatentDataset, batch: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The plain twin: one ``ds[i]`` per image, stacked as a default collate would."""
    items = [ds[int(i)] for i in batch]
    means, stds, labels = zip(*items, strict=True)
    return torch.stack(means), torch.stack(stds), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50, help="batches per timed round")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.images} images, batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        chunk = rng.standard_normal((args.images, 4, 32, 32), dtype=np.float32)
        write_dataset(tmp, chunk, rng.integers(0, 1000, args.images), stds=np.abs(chunk))
        del chunk
        ds = LatentDataset(tmp)
        batches = [rng.integers(0, len(ds), args.batch) for _ in range(args.repeats)]
        fast = seconds_per_call(ds.get_batch, batches)
        plain = seconds_per_call(lambda batch: stacked(ds, batch), batches)
    print("| read | ms per batch | images/s |")
    print("|---|---|---|")
    for name, value in (("get_batch", fast), ("ds[i] one by one, stacked", plain)):
        print(f"| {name} | {value * 1e3:.2f} | {args.batch / value:,.0f} |")


if __name__ == "__main__":
    main()
