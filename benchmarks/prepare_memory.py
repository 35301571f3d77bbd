"""Peak memory of `selfflow prepare` at several image counts: it must not grow with the count.

Each size gets a fresh folder of random JPEGs (``--height`` x ``--width``) in 10 classes and a
fresh `selfflow prepare` process, with a small random AutoencoderKL (the SD-VAE's interface,
one downsampling) so that it runs on a CPU in seconds. The process reports its own peak
resident set (``ru_maxrss``) and the largest of its decoding workers'; both should stay flat
while the image count grows, since a process holds one shard of latents at a time.
Encoding speed here says nothing about the real SD-VAE; see the README for that.

    python benchmarks/prepare_memory.py --sizes 500 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time
from selfflow.data.prepare import PrepareConfig, prepare_dataset
config = PrepareConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
result = prepare_dataset(config, progress=False, log=lambda message: None)
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "images": result.num_images,
    "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def tiny_vae(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(folder)


def image_tree(folder: Path, count: int, height: int, width: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        target = folder / f"class_{i % 10:02d}"
        target.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"{i:07d}.jpg", quality=90)


def measure(count: int, args: argparse.Namespace, work: Path, vae: Path) -> dict:
    images = work / f"images_{count}"
    image_tree(images, count, args.height, args.width)
    config = {
        "image_dir": str(images),
        "out_dir": str(work / f"out_{count}"),
        "vae": str(vae),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "shard_size": args.shard_size,
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000], help="image counts")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print("| images | seconds | main peak RSS (MB) | worker peak RSS (MB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny_vae(work / "vae")
        for count in args.sizes:
            row = measure(count, args, work, work / "vae")
            print(
                f"| {row['images']} | {row['seconds']:.1f} | {row['main_maxrss_mb']:.0f} | "
                f"{row['worker_maxrss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
