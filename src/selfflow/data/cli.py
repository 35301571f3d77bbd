"""`selfflow prepare IMAGE_DIR OUT_DIR`: training latents from an ImageFolder tree."""

from __future__ import annotations

import argparse
import os
import textwrap

from selfflow.data.store import DEFAULT_SHARD_SIZE
from selfflow.options import add_options

DESCRIPTION = (
    "Encode an ImageFolder tree (IMAGE_DIR/<class>/<image>, ImageNet's train/n01440764/...JPEG "
    "layout) into a training dataset: ADM's centre crop to --image-size, the VAE encoder's "
    "(--vae: any diffusers AutoencoderKL, SD-VAE by default) posterior mean and std of every image, and the labels (classes = sorted folder names), in "
    "memory-mapped shards that selfflow.data.LatentDataset reads. Runs on one process or under "
    "torchrun; a killed run continues where it stopped when the same command is run again."
)
EXAMPLE = (
    "examples:\n"
    "  selfflow prepare /data/imagenet/train /data/imagenet256-latents\n"
    "  torchrun --nproc_per_node 8 -m selfflow.cli prepare /data/imagenet/train "
    "/data/imagenet256-latents"
    "\n  selfflow prepare --verify /data/imagenet256-latents   # every shard against its sha256"
)


def default_workers(most: int = 8) -> int:
    """Decoding workers: ``most``, or fewer on a machine with fewer usable CPUs (more
    processes than cores only contend, and torch's DataLoader warns about them)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(most, usable or 1))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="encode an ImageFolder tree (ImageNet train) into SD-VAE latent shards for training",
        description=textwrap.fill(DESCRIPTION, 88, break_on_hyphens=False),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "image_dir",
        metavar="IMAGE_DIR",
        nargs="?",
        help="ImageFolder tree: IMAGE_DIR/<class>/<image>",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        nargs="?",
        help="dataset folder to write: new, empty, or one it started (created if missing)",
    )
    parser.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check every shard of the dataset DIR against the sha256 its manifest records "
        "(reads it all once), print one verdict and exit 1 naming every damaged shard; "
        "writes nothing",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="ADM centre-crop size in pixels, a multiple of the VAE's downsampling (default: 256)",
    )
    parser.add_argument(
        "--latent-norm",
        choices=("none", "channel"),
        default="none",
        help="channel: measure the per-channel mean and std of the scaled latents over the "
        "dataset and store them, so training sees (latents - mean) / std and decoding undoes "
        "it (for VAEs whose latents are not near unit variance; default: none)",
    )
    add_options(
        parser,
        "--vae",
        "--device",
        help={
            "--vae": "the VAE that encodes the images: a hub id or a local diffusers "
            "AutoencoderKL folder (default: stabilityai/sd-vae-ft-ema, SD-VAE); its latent "
            "convention and encoder digest are recorded in the manifest, and a local folder "
            "as its absolute path"
        },
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="stored precision of mean and std: float32 (default, 42 GB for ImageNet) or "
        "float16 (21 GB); read back as float32 either way",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per encoder batch (default: 64)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=default_workers(),
        help="processes that decode and crop JPEGs while the encoder runs; 0 decodes in the "
        "main process (default: 8, or the CPUs this process may use if fewer: here "
        "%(default)s)",
    )
    _selection_options(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a dataset already in OUT_DIR and start over",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _selection_options(parser: argparse.ArgumentParser) -> None:
    """Which images, how they are cut into shards, and what to do with undecodable files."""
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="only the first N images of each class (sorted file names)",
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        metavar="K",
        help="only the first K classes (sorted folder names)",
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        metavar="N",
        help="hold out N images of each class (a fixed choice keyed by each file's path, "
        "recorded in both manifests) into a second dataset beside OUT_DIR, OUT_DIR-val, never "
        "trained on: for selfflow train --val-data",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"images per shard file; fixes the plan, so keep it when resuming (default: {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out files that are not images or do not decode, listing them in the "
        "manifest, instead of stopping at the first",
    )


def run(args: argparse.Namespace) -> int:
    from selfflow.base.errors import ConfigurationError, ReportedOnRankZero
    from selfflow.data.prepare import PrepareConfig, prepare_dataset

    if args.verify is not None:
        if args.image_dir is not None:
            raise ConfigurationError("--verify DIR takes no IMAGE_DIR or OUT_DIR")
        return run_verify(args.verify, progress=not args.no_progress)
    if args.out_dir is None:
        raise ConfigurationError("expected IMAGE_DIR and OUT_DIR (or --verify DIR)")

    config = PrepareConfig(
        image_dir=args.image_dir,
        out_dir=args.out_dir,
        image_size=args.image_size,
        vae=args.vae,
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        limit=args.limit,
        classes=args.classes,
        shard_size=args.shard_size,
        skip_bad_images=args.skip_bad_images,
        overwrite=args.overwrite,
        device=args.device,
        val_per_class=args.val_per_class,
        latent_norm=args.latent_norm,
    )
    try:
        result = prepare_dataset(config, progress=not args.no_progress)
    except ReportedOnRankZero:
        return 1  # rank 0 prints the reason; one message, not one per process
    if result is not None:
        print(f"selfflow prepare: {result.summary()}", flush=True)
    return 0


def run_verify(folder: str, progress: bool) -> int:
    """``prepare --verify DIR``: every shard hashed; one line, exit 1 naming every bad shard."""
    import time

    from selfflow.data import LatentDataset
    from selfflow.data.verify import damaged_error, verify_all

    dataset = LatentDataset(folder, check_files=False)  # verify_all names every bad file
    began = time.perf_counter()
    problems = verify_all(dataset, progress=progress)
    if problems:
        raise damaged_error(dataset, problems)
    seconds = time.perf_counter() - began
    size = sum(dataset.shard_path(k).stat().st_size for k in range(dataset.num_shards))
    print(
        f"selfflow prepare: {folder}: all {dataset.num_shards} shards ({size / 1e9:.2f} GB, "
        f"{len(dataset):,} images) match the manifest's sha256 (checked in {seconds:.1f} s)",
        flush=True,
    )
    return 0
