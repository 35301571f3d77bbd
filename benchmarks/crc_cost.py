"""What the CRC-32 pass over a checkpoint costs: seconds for a file the size of the release.

``selfflow.model.checkpoint.torch_load_verified`` reads every entry of a ``torch.save`` archive to its
end before ``torch.load`` (which never checks the archive's CRC-32s). This writes a file of
random float32 tensors with the released checkpoint's size (2.7 GB by default) under a
temporary folder, then times, on the same warm page cache and in this order:

* a plain read of the file (the floor for any pass over it),
* the CRC pass alone (``verify_torch_archive``),
* ``torch.load(weights_only=True)`` alone,
* ``torch_load_verified`` (the pass, then the load): what every reader in the package pays.

Then the same four again from disk: before each, the file's pages are dropped from the page
cache (``posix_fadvise(DONTNEED)`` on this file only; nothing else is evicted), so the pass pays
for reading the file, and the load that follows finds it cached. The file is deleted at the
end, also on errors and Ctrl-C. Figures depend on the disk: a network filesystem is slower.

    python benchmarks/crc_cost.py                 # 2.7 GB
    python benchmarks/crc_cost.py --gigabytes 0.5 --dir /scratch
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.model.checkpoint import torch_load_verified, verify_torch_archive

RELEASED_BYTES = 2.72e9  # selfflow_imagenet256.pt: 680.4 M float32 values


def write_random_checkpoint(path: Path, total_bytes: float, tensor_mb: int = 64) -> int:
    """A state dict of random float32 tensors, ``tensor_mb`` MiB each, ``total_bytes`` in all."""
    per_tensor = tensor_mb * (1 << 20) // 4
    count = max(1, round(total_bytes / (per_tensor * 4)))
    generator = torch.Generator().manual_seed(0)
    state = {
        f"blocks.{i}.weight": torch.randn(per_tensor, generator=generator) for i in range(count)
    }
    torch.save(state, path)
    return path.stat().st_size


def timed(label: str, fn) -> float:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    print(f"  {label:<34} {seconds:7.2f} s", flush=True)
    return seconds


def drop_from_page_cache(path: Path) -> None:
    """Evict this file's pages (written back first), so that the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(path: Path, size: int, cold: bool) -> None:
    """Time the four passes; with ``cold``, each one starts with the file out of the cache."""

    def run(label: str, fn) -> float:
        if cold:
            drop_from_page_cache(path)
        return timed(label, fn)

    print("from disk (file dropped from the page cache before each):" if cold else "warm cache:")
    read = run("plain read", lambda: plain_read(path))
    crc = run("CRC-32 pass (verify_torch_archive)", lambda: verify_torch_archive(path))
    load = run("torch.load alone", lambda: torch.load(path, map_location="cpu", weights_only=True))
    both = run("torch_load_verified", lambda: torch_load_verified(path))
    print(
        f"  CRC pass: {size / crc / 1e9:.2f} GB/s ({crc / read:.1f}x a plain read); "
        f"torch_load_verified costs {both / load:.2f}x torch.load alone (+{both - load:.2f} s)"
    )


def plain_read(path: Path, chunk: int = 1 << 22) -> None:
    with open(path, "rb") as handle:
        while handle.read(chunk):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gigabytes", type=float, default=RELEASED_BYTES / 1e9, help="file size (default: 2.72)"
    )
    parser.add_argument(
        "--dir", default=None, help="folder for the temporary file (default: the system's /tmp)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="selfflow-crc-", dir=args.dir) as folder:
        path = Path(folder) / "random.pt"
        print(f"writing {args.gigabytes:.2f} GB of random tensors to {path} ...", flush=True)
        size = write_random_checkpoint(path, args.gigabytes * 1e9)
        print(f"{size / 1e9:.2f} GB; {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
        plain_read(path)  # warm the page cache, so that every pass below sees the same cache
        measure(path, size, cold=False)
        if hasattr(os, "posix_fadvise"):
            measure(path, size, cold=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
