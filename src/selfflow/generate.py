"""`selfflow generate`: a few images of chosen classes, as one grid PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from selfflow.errors import ConfigurationError


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
    parser.add_argument(
        "--ckpt", type=Path, default=None, help="checkpoint (default: download the released one)"
    )
    parser.add_argument(
        "--vae",
        default=None,
        help="VAE hub id or local diffusers folder (default: stabilityai/sd-vae-ft-ema)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="run seed; image i uses the stream (seed, i)"
    )
    parser.add_argument("--num-steps", type=int, default=250, help="sampler steps (default: 250)")
    parser.add_argument(
        "--mode",
        type=str.lower,
        choices=("sde", "ode"),
        default="sde",
        help="sampler (default: sde)",
    )
    parser.add_argument(
        "--solver",
        type=str.lower,
        choices=("euler", "heun"),
        default="heun",
        help="ODE solver (default: heun)",
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale (default: 1.0, none)",
    )
    parser.add_argument(
        "--guidance-low",
        type=float,
        default=0.0,
        help="guidance applies while tau >= this (default: 0.0)",
    )
    parser.add_argument(
        "--guidance-high",
        type=float,
        default=0.7,
        help="guidance applies while tau <= this (default: 0.7)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="network precision: float32 = plain reference network, bfloat16 = fast path "
        "(default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--columns", type=int, default=None, help="grid columns (default: square-ish)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num <= 0:
        raise ConfigurationError(f"--num must be positive; got {args.num}")
    if args.out.exists() and args.out.is_dir():
        raise ConfigurationError(f"--out must be a PNG file path; {args.out} is a folder")
    import torch

    from selfflow.images import save_grid
    from selfflow.pipeline import SelfFlowPipeline

    pipe = SelfFlowPipeline.from_pretrained(
        args.ckpt, args.vae, device=args.device, dtype=args.dtype
    )
    labels = [args.classes[i % len(args.classes)] for i in range(args.num)]
    start = time.perf_counter()
    images = pipe(
        labels,
        seed=args.seed,
        num_steps=args.num_steps,
        mode=args.mode,
        solver=args.solver,
        cfg_scale=args.cfg_scale,
        guidance_interval=(args.guidance_low, args.guidance_high),
        progress=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.out, args.columns)
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.out} ({args.num} images, {seconds:.1f} s on {pipe.device}, torch {torch.__version__})"
    )
    return 0
