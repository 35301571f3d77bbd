"""``selfflow sweep``: FID over guidance scales, intervals, modes, steps, checkpoints and EMA
lengths, one FID batch per cell, resumable, on one process or under torchrun.

The command takes every option of ``selfflow sample`` (the sample command's own parser
definitions, so the two never drift apart); the axes it sweeps take several values instead of
one, and ``--guidance-interval LOW:HIGH`` stands for ``--guidance-low``/``--guidance-high``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfflow.batch.cli import config_from_args
from selfflow.batch.cli import configure as configure_sample
from selfflow.options import OPTIONS
from selfflow.sampling.settings import DEFAULT_CFG_SCALE, DEFAULT_GUIDANCE_INTERVAL, DEFAULT_MODE

DESCRIPTION = (
    "Sample and evaluate every combination (cell) of the given checkpoints, EMA lengths, modes, "
    "step counts, guidance scales and guidance intervals. Each cell is an ordinary FID batch "
    "in OUTPUT_DIR/CELL/ (what `selfflow sample --eval-ref` makes, the same npz bytes at the "
    "same --batch-size), so a killed sweep resumes cell by cell and shard by shard, and a "
    "finished cell is never sampled again. Guidance scale 1.0 ignores the interval: it is one "
    "cell. Results: OUTPUT_DIR/results.csv, results.json, results.md (sorted by FID) and "
    "fid.png (FID against the guidance scale, a line per interval), rebuilt after each cell "
    "from every cell in the folder, so rerunning with more values adds rows. The best cell is "
    "the last line printed. Every other option is `selfflow sample`'s, for all cells."
)
EXAMPLE = (
    "example: torchrun --nproc_per_node=8 -m selfflow.cli sweep --ckpt model.pt "
    "--cfg-scale 1.0 1.5 2.0 --guidance-interval 0.0:0.7 0.0:1.0 --num-fid-samples 10000 "
    "--eval-ref VIRTUAL_imagenet256_labeled.npz --output-dir sweep"
)


_GROUP_TITLES = {
    "official sample.py options": "sample options (for every cell)",
    "selfflow options": "more sample options (for every cell)",
}


def _interval(text: str) -> tuple[float, float]:
    from selfflow.base.errors import ConfigurationError
    from selfflow.research.plan import parse_interval

    try:
        return parse_interval(text)
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``sample``'s options, then the swept ones in their place: ``parser`` is made with
    ``conflict_handler="resolve"``, under which a later definition of an option replaces the
    earlier one."""
    if parser.conflict_handler != "resolve":
        raise ValueError("the sweep's parser needs conflict_handler='resolve'")
    configure_sample(parser)
    axes = parser.add_argument_group("swept options (each takes one or more values)")
    axes.add_argument(
        "--ckpt",
        nargs="+",
        required=True,
        metavar="PATH",
        help="checkpoint files (several of one run: FID along training), or run folders with "
        "--ema-length",
    )
    axes.add_argument(
        "--ema-length",
        nargs="+",
        type=float,
        default=[],
        metavar="SIGMA_REL",
        help="post-hoc EMA lengths (relative standard deviation) reconstructed from each run "
        "folder's snapshots (selfflow train --posthoc-ema); only with run folders",
    )
    axes.add_argument(
        "--cfg-scale",
        nargs="+",
        type=float,
        default=[DEFAULT_CFG_SCALE],
        metavar="S",
        help=f"classifier-free guidance scales, 1.0 = none (default: {DEFAULT_CFG_SCALE})",
    )
    axes.add_argument(
        "--guidance-interval",
        nargs="+",
        type=_interval,
        default=[DEFAULT_GUIDANCE_INTERVAL],
        metavar="LOW:HIGH",
        help="guidance applies while LOW <= tau <= HIGH, tau = 1 being noise; 0 <= LOW < HIGH "
        "<= 1 (default: {}:{})".format(*DEFAULT_GUIDANCE_INTERVAL),
    )
    mode = dict(OPTIONS["--mode"])
    axes.add_argument("--mode", nargs="+", type=mode["type"], choices=mode["choices"],
                      default=[DEFAULT_MODE.upper()], help=mode["help"])  # fmt: skip
    axes.add_argument("--num-steps", nargs="+", type=int, default=[None], metavar="N",
                      help=OPTIONS["--num-steps"]["help"])  # fmt: skip
    sweep = parser.add_argument_group("sweep options")
    sweep.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        metavar="SWEEP",
        help="the sweep's folder: a folder per cell, the results and the plot",
    )
    sweep.add_argument(
        "--eval-ref",
        required=True,
        metavar="REF.npz",
        help="ADM reference batch every cell is evaluated against (its features are computed "
        "once and cached)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, whether each is finished, the images to sample and the time "
        "(estimated from the first finished cell's rate); sample nothing",
    )
    for name in ("--guidance-low", "--guidance-high"):  # replaced by --guidance-interval
        parser.add_argument(name, type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)  # refused
    for group in parser._action_groups:
        group.title = _GROUP_TITLES.get(group.title, group.title)
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="FID over guidance scales, intervals, checkpoints and EMA lengths; resumable",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        conflict_handler="resolve",
    )
    configure(parser)


def sweep_config_from_args(args: argparse.Namespace):
    """The :class:`~selfflow.research.sweep.SweepConfig` of the command line."""
    from selfflow.base.errors import ConfigurationError
    from selfflow.research.sweep import SweepConfig

    for name in ("guidance_low", "guidance_high"):
        if getattr(args, name) is not None:
            raise ConfigurationError(
                f"--{name.replace('_', '-')} is `sample`'s; a sweep takes --guidance-interval "
                f"LOW:HIGH (one or more)"
            )
    single = argparse.Namespace(**vars(args))
    single.ckpt, single.cfg_scale, single.mode, single.num_steps = (
        None,
        DEFAULT_CFG_SCALE,
        DEFAULT_MODE,
        None,
    )
    single.guidance_low, single.guidance_high = DEFAULT_GUIDANCE_INTERVAL
    return SweepConfig(
        checkpoints=args.ckpt,
        output_dir=args.output_dir,
        base=config_from_args(single),
        cfg_scales=args.cfg_scale,
        intervals=args.guidance_interval,
        modes=args.mode,
        num_steps=args.num_steps,
        ema_lengths=args.ema_length,
    )


def run(args: argparse.Namespace) -> int:
    from selfflow.base.errors import ReportedOnRankZero
    from selfflow.research.sweep import dry_run, run_sweep

    config = sweep_config_from_args(args)
    if args.dry_run:
        for line in dry_run(config):
            print(line, flush=True)
        return 0
    try:
        run_sweep(config)
    except ReportedOnRankZero:
        return 1  # rank 0 prints the reason; one message, not one per process
    return 0
