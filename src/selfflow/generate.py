"""`selfflow generate`: a few images of chosen classes, as one grid PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from selfflow.errors import ConfigurationError
from selfflow.options import add_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a few images of given classes and save them as a grid PNG",
        description=(
            "Generate images of ImageNet classes with the released Self-Flow model and write "
            "them as one grid picture. Example: selfflow generate --class 207 --num 8 --out grid.png"
        ),
    )
    parser.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        default=[207],
        metavar="LABEL",
        help="ImageNet class ids 0-999 (1000 = unconditional); the grid cycles through them (default: 207)",
    )
    parser.add_argument("--num", type=int, default=8, help="number of images (default: 8)")
    parser.add_argument(
        "--out", type=Path, default=Path("grid.png"), help="output PNG (default: grid.png)"
    )
    add_options(parser, "--ckpt", "--vae", "--seed", seed=0)
    add_options(parser, "--num-steps", "--mode", "--solver", "--cfg-scale")
    add_options(parser, "--guidance-low", "--guidance-high", "--device", "--dtype")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per network batch; image i is the same whatever the batch (default: 32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the bf16 fast path: pays off from a few hundred images on "
        "(compiling takes about a minute); off by default here",
    )
    parser.add_argument(
        "--columns", type=int, default=None, help="grid columns (default: square-ish)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num <= 0 or args.batch_size <= 0:
        raise ConfigurationError(
            f"--num and --batch-size must be positive; got {args.num} and {args.batch_size}"
        )
    if args.out.exists() and args.out.is_dir():
        raise ConfigurationError(f"--out must be a PNG file path; {args.out} is a folder")
    import numpy as np
    import torch
    from tqdm import trange

    from selfflow.images import save_grid
    from selfflow.pipeline import SelfFlowPipeline

    pipe = SelfFlowPipeline.from_pretrained(
        args.ckpt, args.vae, device=args.device, dtype=args.dtype, compile=args.compile
    )
    labels = [args.classes[i % len(args.classes)] for i in range(args.num)]
    start = time.perf_counter()
    chunks = []
    for first in trange(0, args.num, args.batch_size, desc="batches", unit="batch"):
        indices = range(first, min(first + args.batch_size, args.num))
        chunks.append(
            pipe(
                [labels[i] for i in indices],
                indices=indices,
                seed=args.seed,
                num_steps=args.num_steps,
                mode=args.mode,
                solver=args.solver,
                cfg_scale=args.cfg_scale,
                guidance_interval=(args.guidance_low, args.guidance_high),
                progress=True,
            )
        )
    images = np.concatenate(chunks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.out, args.columns)
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.out} ({args.num} images, {seconds:.1f} s on {pipe.device}, torch {torch.__version__})"
    )
    return 0
