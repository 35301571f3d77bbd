"""``selfflow sample`` (and the root ``sample.py``): the 50 000-image FID batch.

Accepts the official ``sample.py`` command lines unchanged, on one process or under
``torchrun --nnodes=... --nproc_per_node=...``; the options after ``--save-images`` are ours.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from selfflow.options import add_options

DESCRIPTION = (
    "Sample the FID batch (samples_N.npz, arr_0 uint8 (N, H, W, 3) in index order, labels in "
    "arr_1) from the released Self-Flow model, on one process or under torchrun. Sample i's "
    "label, start noise and every Brownian increment come from streams keyed by (seed, i). "
    "At one --batch-size the images are byte-identical on any number of GPUs, in a short last "
    "batch and after a resume: every network call sees --batch-size rows (N if fewer) and every "
    "VAE decode 8 latents. Kernels round per batch shape, so another --batch-size rounds "
    "differently (same noise, same distribution; a resume that changes it says so). "
    "Work is written in atomic shards with a manifest.json of the settings: re-running the same "
    "command continues an interrupted run; a run with other settings in the same folder is "
    "refused (or starts over with --overwrite)."
)
EXAMPLE = (
    "example: torchrun --nnodes=1 --nproc_per_node=8 sample.py --output-dir ./samples "
    "--num-fid-samples 50000 --num-steps 250 --mode SDE --cfg-scale 1.0"
)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of the command to ``parser`` (shared by the subcommand and sample.py)."""
    _official_options(parser.add_argument_group("official sample.py options"))
    _selfflow_options(parser.add_argument_group("selfflow options"))
    parser.set_defaults(func=run)
    return parser


def _official_options(official: argparse._ArgumentGroup) -> None:
    """The options of the official ``sample.py``, with its names and defaults."""
    add_options(official, "--ckpt")
    official.add_argument(
        "--output-dir",
        type=Path,
        default=Path("./samples"),
        metavar="DIR",
        help="folder for shards, manifest.json, samples_N.npz and grid.png (default: ./samples)",
    )
    official.add_argument(
        "--num-fid-samples",
        type=int,
        default=50_000,
        metavar="N",
        help="number of images (default: 50000); a folder that holds a finished run of "
        "another N with the same settings reuses its images and samples only the rest",
    )
    official.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="B",
        help="images per forward pass, per process; keep one value for byte-identical images "
        "(default: 64)",
    )
    add_options(
        official,
        "--num-steps",
        "--mode",
        "--seed",
        "--cfg-scale",
        "--guidance-low",
        "--guidance-high",
    )
    official.add_argument(
        "--save-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also write every image as DIR/images/000123.png, named by its global index "
        "(default: no)",
    )


def _selfflow_options(ours: argparse._ArgumentGroup) -> None:
    """Options the official script lacks: solver, VAE, devices, folder handling, evaluation."""
    add_options(ours, "--solver", "--vae", "--allow-vae-mismatch")
    ours.add_argument(
        "--class-balanced",
        action="store_true",
        help="exactly N/K images of each of the model's K classes (1000 for the released "
        "model) in a seeded shuffled order (N must be divisible by K); default: labels uniform "
        "at random over the model's classes, as in the paper",
    )
    add_options(ours, "--device", "--dtype")
    ours.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what a previous run left in DIR (manifest, shards, npz, grid, PNGs) and "
        "start over",
    )
    ours.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="S",
        help="images per shard file, fixed for the folder on its first run "
        "(default: min(125, ceil(N/64)); never depends on the GPU count or batch size)",
    )
    ours.add_argument(
        "--keep-shards",
        action="store_true",
        help="keep DIR/shards/ after samples_N.npz is written (default: delete them)",
    )
    ours.add_argument(
        "--eval-ref",
        default=None,
        metavar="REF.npz",
        help="after sampling, evaluate against this ADM reference batch and print ADM's five lines",
    )
    ours.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="with --eval-ref: ADM's classify_image_graph_def.pb (default: the cached download)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample the FID batch (samples_N.npz) on one process or under torchrun; resumable",
        description=DESCRIPTION,
        epilog=EXAMPLE,
    )
    configure(parser)


def config_from_args(args: argparse.Namespace):
    from selfflow.batch import BatchConfig

    return BatchConfig(
        checkpoint=args.ckpt,
        output_dir=args.output_dir,
        num_samples=args.num_fid_samples,
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        mode=args.mode,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
        save_images=args.save_images,
        solver=args.solver,
        vae=args.vae,
        allow_vae_mismatch=args.allow_vae_mismatch,
        class_balanced=args.class_balanced,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        keep_shards=args.keep_shards,
        eval_ref=args.eval_ref,
        inception=args.inception,
    )


def run(args: argparse.Namespace) -> int:
    from selfflow.base.errors import ReportedOnRankZero
    from selfflow.batch import generate_fid_batch

    try:
        result = generate_fid_batch(config_from_args(args))
    except ReportedOnRankZero:
        return 1  # rank 0 prints the reason; one message, not one per process
    if result is not None:
        print(f"selfflow sample: {result.summary()}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "sample.py") -> int:
    """Stand-alone entry point (the root ``sample.py``): errors become one line, exit status 1."""
    from selfflow.cli import run_reporting_errors

    parser = configure(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLE))
    return run_reporting_errors(parser.parse_args(argv), prog)
