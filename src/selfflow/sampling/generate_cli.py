"""`selfflow generate`: a few images of chosen classes, as one grid picture."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from selfflow.base.classes import NUM_IMAGENET_CLASSES, ImageNetClass
from selfflow.base.errors import ConfigurationError
from selfflow.options import add_options

UNCONDITIONAL = "unconditional"
DEFAULT_CLASS = 207  # golden retriever, for the released model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a few images of given classes and save them as one grid picture",
        description=(
            "Generate images of chosen classes with the released Self-Flow model (or --ckpt, "
            "e.g. an export of your own run: its own classes and VAE) and write them as one "
            "grid picture (PNG, JPEG or WebP by the extension of --out). Example: "
            "selfflow generate --class 207 'tabby cat' --num 8 --captions --out grid.png"
        ),
    )
    parser.add_argument(
        "--class",
        dest="classes",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="the model's classes by number, WordNet id or (part of) a name, e.g. 207, "
        "n02099601 or 'golden retriever' for the released model's ImageNet classes, or a class "
        "folder's name for a model trained on your own; 'unconditional' (or the null label, "
        "1000 for ImageNet) for none. The grid cycles through them; `selfflow classes [--ckpt "
        "CKPT] QUERY` lists the names (default: 207, or 0 for a model of fewer classes)",
    )
    parser.add_argument("--num", type=int, default=8, help="number of images (default: 8)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("grid.png"),
        help="output picture; its extension picks the format: .png, .jpg/.jpeg or .webp "
        "(default: grid.png)",
    )
    add_options(parser, "--ckpt", "--vae", "--allow-vae-mismatch", "--seed", seed=0)
    add_options(parser, "--num-steps", "--mode", "--solver", "--cfg-scale")
    add_options(parser, "--guidance-low", "--guidance-high", "--device", "--dtype")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per network batch: every batch has min(--batch-size, --num) rows (a short "
        "last one is padded), so image i's bytes depend on that number and the settings, not "
        "on which batch it falls in; another value rounds differently (default: 32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the bf16 fast path: pays off from a few hundred images on "
        "(compiling takes about a minute); off by default here",
    )
    parser.add_argument(
        "--columns", type=int, default=None, help="grid columns, at least 1 (default: square-ish)"
    )
    parser.add_argument(
        "--captions",
        action="store_true",
        help="write each image's class number and name under it (default: no captions)",
    )
    parser.set_defaults(func=run)


def resolve_class(query: str, classes: Sequence[ImageNetClass] | None = None) -> int:
    """A label among ``classes`` (default: ImageNet's) from a number, a WordNet id or a name;
    'unconditional' or the null label's number (``len(classes)``) is the null label."""
    from selfflow.base.classes import class_index

    null = len(classes) if classes is not None else NUM_IMAGENET_CLASSES
    if str(query).strip().lower() in (UNCONDITIONAL, str(null)):
        return null
    return class_index(str(query), classes)


def caption(label: int, classes: Sequence[ImageNetClass] | None = None) -> str:
    """``"3 boat"``: the label and the model's name for it (default: ImageNet's)."""
    from selfflow.base.classes import imagenet_classes

    classes = imagenet_classes() if classes is None else classes
    if label == len(classes):
        return "unconditional"
    return f"{label} {classes[label].name}"


def check_output(path: Path) -> None:
    """The picture can be written where --out says, in a format its extension names."""
    from selfflow.base.files import check_can_write
    from selfflow.base.images import image_format

    if path.is_dir():
        raise ConfigurationError(f"--out must be a picture file; {path} is a folder")
    image_format(path)
    check_can_write(path.parent, f"--out {path}")


def _validate(args: argparse.Namespace):
    """Every option checked before any model is loaded (the classes from the checkpoint's
    card, read without its weights); returns (labels, settings, the model's classes)."""
    from selfflow.model.checkpoint import checkpoint_classes
    from selfflow.sampling.settings import OPTION_NAMES, SamplerSettings

    for name, value in (("--num", args.num), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigurationError(f"{name} must be at least 1; got {value}")
    if args.columns is not None and args.columns < 1:
        raise ConfigurationError(f"--columns must be at least 1; got {args.columns}")
    check_output(args.out)
    classes = checkpoint_classes(args.ckpt)
    queries = args.classes
    if queries is None:
        queries = [str(DEFAULT_CLASS if len(classes) > DEFAULT_CLASS else 0)]
    chosen = [resolve_class(query, classes) for query in queries]
    labels = [chosen[i % len(chosen)] for i in range(args.num)]
    settings = SamplerSettings(
        args.num_steps,
        args.mode,
        args.solver,
        args.cfg_scale,
        (args.guidance_low, args.guidance_high),
        names=OPTION_NAMES,
    )
    return labels, settings, classes


def run(args: argparse.Namespace) -> int:
    labels, settings, classes = _validate(args)
    import numpy as np
    import torch
    from tqdm import trange

    from selfflow.base.images import save_grid
    from selfflow.sampling.pipeline import SelfFlowPipeline

    pipe = SelfFlowPipeline.from_pretrained(
        args.ckpt,
        args.vae,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        allow_vae_mismatch=args.allow_vae_mismatch,
    )
    shape = min(args.batch_size, args.num)
    start = time.perf_counter()
    chunks = []
    for first in trange(0, args.num, shape, desc="batches", unit="batch"):
        indices = range(first, min(first + shape, args.num))
        chunks.append(
            pipe(
                [labels[i] for i in indices],
                indices=indices,
                seed=args.seed,
                num_steps=settings.num_steps,
                mode=settings.mode,
                solver=settings.solver,
                cfg_scale=settings.cfg_scale,
                guidance_interval=settings.guidance_interval,
                batch_size=shape,
                progress=True,
            )
        )
    images = np.concatenate(chunks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    captions = [caption(label, classes) for label in labels] if args.captions else None
    save_grid(images, args.out, args.columns, captions=captions)
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.out} ({args.num} images, {settings.mode.upper()} {settings.num_steps} "
        f"steps, {seconds:.1f} s on {pipe.device}, torch {torch.__version__})"
    )
    return 0
