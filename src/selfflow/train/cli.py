"""``selfflow train`` (and the root ``train.py`` for torchrun) and ``selfflow export``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from selfflow.options import add_options

DESCRIPTION = (
    "Train Self-Flow (dual-timestep scheduling + EMA self-distillation) or the SiT flow-matching "
    "baseline on a `selfflow prepare` dataset, on one process or under torchrun (DDP; --fsdp "
    "shards). Step k's global batch (images, posterior draws, times, masks, noise, label drops) "
    "depends only on (seed, k), so any process count and any --batch-size split train the same "
    "run. Rerunning the same command resumes from the newest intact checkpoint in "
    "--output-dir; a folder holding another run is refused, naming the difference."
)
EXAMPLE = (
    "example (ImageNet 256, 8 GPUs): torchrun --nproc_per_node=8 train.py --data latents/ "
    "--output-dir runs/xl2 --model XL/2 --steps 4000000 --global-batch-size 256"
)


def _data_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("data and run")
    where.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="dataset folder (selfflow prepare or selfflow.data.write_dataset)",
    )
    where.add_argument(
        "--output-dir",
        required=True,
        metavar="RUN",
        help="run folder: checkpoints, exports, log.jsonl, tensorboard/, samples/",
    )
    where.add_argument(
        "--steps",
        type=int,
        required=True,
        help="train until this many optimiser steps (a resume may raise it)",
    )
    add_options(
        where,
        "--vae",
        "--allow-vae-mismatch",
        help={
            "--vae": "the VAE that decodes the sample grids and evaluations and that the "
            "exports record (default: the one the dataset records); its encoder must be the "
            "one that made the data's latents (checked)"
        },
    )
    where.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="start from these weights (the released checkpoint or any export), checked key by key before any work; recorded with the run, and a resume takes every weight from its checkpoint",
    )
    where.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check a start makes (dataset, sizes and batch split, the run folder "
        "and its newest checkpoint, --init-from's keys, --eval-ref, free space) and print the "
        "plan; writes nothing and trains nothing. Run it on a login node with the job's "
        "options before the job waits in a queue",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="XL/2",
        choices=("tiny", "S/2", "B/2", "L/2", "XL/2"),
        help="SiT size: S/2 384/12/6, B/2 768/12/12, L/2 1024/24/16, XL/2 1152/28/16 (width/depth/heads), tiny = ModelConfig.tiny(); the input shape comes from the data, the classes too unless --num-classes (default: XL/2)",
    )
    model.add_argument("--hidden-size", type=int, default=None, help="override the width")
    model.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    model.add_argument("--num-heads", type=int, default=None, help="override the attention heads")
    model.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="the model's label space, at least the dataset's classes (default: the dataset's); "
        "--num-classes 1000 fine-tunes the released model on a subset made with "
        "selfflow prepare --classes K, whose labels are ImageNet's 0..K-1",
    )


def _objective_options(parser: argparse.ArgumentParser) -> None:
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--method",
        default="selfflow",
        choices=("selfflow", "flow", "dual"),
        help="selfflow; flow = plain flow matching (SiT baseline: mask ratio 0, no representation loss, projector frozen); dual = dual-timestep scheduling without the representation loss (the paper's 'without L_rep' ablation: mask ratio 0.25, no teacher forward, the flow baseline's cost) (default: selfflow)",
    )
    objective.add_argument(
        "--mask-ratio",
        type=float,
        default=None,
        help="share of tokens noised at the second time s (default: 0.25; 0 with --method flow)",
    )
    objective.add_argument(
        "--rep-weight",
        type=float,
        default=None,
        help="weight gamma of the representation loss (default: 0.8; 0 with --method flow or dual; 0 with --method selfflow is the dual ablation, said at the start)",
    )
    objective.add_argument(
        "--student-layer",
        type=int,
        default=None,
        help="1-based block whose output the student projects (default: round(0.3*depth))",
    )
    objective.add_argument(
        "--teacher-layer",
        type=int,
        default=None,
        help="1-based EMA block the student aligns to, deeper than the student's (default: round(0.7*depth); for depths where it is not deeper, the student layer + 1; a given layer that is not deeper is refused)",
    )
    objective.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="probability a label is replaced by the null class, for student and teacher alike (default: 0.1)",
    )


def _optimisation_options(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--global-batch-size",
        type=int,
        default=256,
        help="samples per optimiser step over all processes (default: 256)",
    )
    optim.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="micro-batch per process; smaller than global/processes means gradient accumulation, same maths (default: global/processes)",
    )
    optim.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="AdamW learning rate, constant, no warm-up (default: 1e-4)",
    )
    optim.add_argument(
        "--ema-decay",
        type=float,
        default=0.9999,
        help="EMA decay; the EMA is the teacher and the sampled model (default: 0.9999)",
    )
    optim.add_argument(
        "--grad-clip", type=float, default=1.0, help="gradient clipping max-norm (default: 1.0)"
    )
    optim.add_argument(
        "--seed",
        type=int,
        default=0,
        help="run seed: initial weights and every step's random numbers (default: 0)",
    )
    add_options(optim, "--device")
    optim.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="compute precision: bfloat16 autocast (weights, optimiser and EMA stay float32) or float32 (default: bfloat16 on CUDA, float32 on CPU)",
    )
    optim.add_argument(
        "--network",
        choices=("fast", "plain"),
        default="fast",
        help="fast: the training forward that computes each block's modulation once per distinct "
        "time (selfflow.train.FastTrainingDiT, compiled on CUDA); plain: the model itself, its "
        "tested reference twin. Same parameters and checkpoints (default: fast)",
    )
    optim.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the fast network's block function, one graph for every block "
        "(default: on CUDA, off elsewhere). --no-compile trains the same network eagerly: "
        "slower on a GPU, the same maths; for nodes where compilation fails (Triton, which "
        "torch.compile uses on GPUs, needs a C compiler) or to debug",
    )
    optim.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimiser state over the processes (FSDP2 fully_shard), for models that outgrow one GPU",
    )


def _checkpoint_options(parser: argparse.ArgumentParser) -> None:
    save = parser.add_argument_group("checkpoints")
    save.add_argument(
        "--checkpoint-every",
        type=int,
        default=10_000,
        help="checkpoint (and EMA export) every N steps; also on SIGTERM/SIGINT and at the end (default: 10000)",
    )
    save.add_argument(
        "--keep-last", type=int, default=3, help="keep the newest N checkpoints (default: 3)"
    )
    save.add_argument(
        "--keep-every",
        type=int,
        default=None,
        help="also keep every checkpoint whose step is a multiple of N (milestones)",
    )


def _posthoc_options(parser: argparse.ArgumentParser) -> None:
    posthoc = parser.add_argument_group(
        "post-hoc EMA (Karras et al. 2024, EDM2): choose the EMA length after training"
    )
    posthoc.add_argument(
        "--posthoc-ema",
        type=float,
        nargs="+",
        default=(),
        metavar="SIGMA_REL",
        help="also keep power-function EMAs of the weights with these relative lengths σ_rel "
        "in (0, 0.2887) (EDM2: 0.05 0.10), beside the recipe's EMA (which stays the teacher), "
        "and snapshot them; `selfflow export RUN OUT.pt --ema-length σ` then reconstructs "
        "any σ_rel. Part of the run's identity (default: none)",
    )
    posthoc.add_argument(
        "--snapshot-every",
        type=int,
        default=None,
        metavar="K",
        help="write a snapshot of the --posthoc-ema EMAs every K steps and at the last step, "
        "to RUN/phema/; never pruned (default: --checkpoint-every)",
    )


def _watch_options(parser: argparse.ArgumentParser) -> None:
    watch = parser.add_argument_group("watching")
    watch.add_argument(
        "--log-every",
        type=int,
        default=100,
        help="write averaged scalars to TensorBoard and log.jsonl every N steps (default: 100)",
    )
    watch.add_argument(
        "--sample-every",
        type=int,
        default=10_000,
        help="sample a grid from fixed labels and noise with the EMA every N steps; 0 = never (default: 10000)",
    )
    watch.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N steps sample --eval-samples images with the EMA (the FID batch, all processes) and score FID/sFID/IS/P/R; 0 = never (default)",
    )
    watch.add_argument(
        "--eval-samples", type=int, default=10_000, help="images per evaluation (default: 10000)"
    )
    watch.add_argument(
        "--eval-ref", default=None, metavar="REF.npz", help="ADM reference batch for --eval-every"
    )
    watch.add_argument(
        "--val-data",
        default=None,
        metavar="DIR",
        help="held-out dataset for the validation loss (selfflow prepare --val-per-class "
        "writes one beside the training data; or another split prepared alike): same latent "
        "shape and classes as --data, checked by name before training",
    )
    watch.add_argument(
        "--val-every",
        type=int,
        default=0,
        help="every N steps (and at step 0) the flow loss and representation cosine of the "
        "online model and the EMA on --val-data at tau 0.1, 0.3, 0.5, 0.7, 0.9 with fixed noise "
        "and posterior draws, to log.jsonl (kind val) and TensorBoard (val/); 0 = never (default)",
    )
    watch.add_argument(
        "--val-samples",
        type=int,
        default=10_000,
        help="rows of --val-data per validation, spread evenly over it (default: 10000, or "
        "all if fewer)",
    )
    watch.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``selfflow train`` (shared by the subcommand and ``train.py``)."""
    _data_options(parser)
    _model_options(parser)
    _objective_options(parser)
    _optimisation_options(parser)
    _checkpoint_options(parser)
    _posthoc_options(parser)
    _watch_options(parser)
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace):
    from selfflow.train.config import TrainConfig

    names = TrainConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["data"] = str(values["data"])
    values["output_dir"] = str(values["output_dir"])
    values["posthoc_ema"] = tuple(values.get("posthoc_ema") or ())
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from selfflow.base.errors import ReportedOnRankZero
    from selfflow.base.launch import launch_environment
    from selfflow.train.trainer import StoppedBySignal, train

    try:
        result = train(config_from_args(args), dry_run=args.dry_run)
    except ReportedOnRankZero:
        return 1
    except StoppedBySignal as stop:
        if launch_environment(rendezvous=False).rank == 0:  # RANK, or srun's SLURM_PROCID
            print(f"selfflow train: {stop}", flush=True)
        return 128 + int(stop.signum)
    if result.rank != 0 or args.dry_run:
        return 0
    print(
        f"selfflow train: at step {result.step}; checkpoint {result.checkpoint}, "
        + (f"EMA export {result.export}" if result.export else "no EMA export of that step"),
        flush=True,
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train Self-Flow (or the SiT baseline) on one process or under torchrun; resumable",
        description=DESCRIPTION,
        epilog=EXAMPLE,
    )
    configure(parser)
    export = subparsers.add_parser(
        "export",
        help="write a run's EMA weights as a checkpoint that selfflow sample --ckpt loads",
        description=(
            "Export the EMA weights of a training run (its newest intact checkpoint, or --step) "
            "or of one training checkpoint file, with the model's config, in the format "
            "selfflow.load_model, SelfFlowPipeline and selfflow sample --ckpt load strictly."
        ),
    )
    export.add_argument("run", metavar="RUN", help="run folder or training checkpoint file")
    export.add_argument("out", metavar="OUT.pt", help="file to write (.pt or .safetensors)")
    export.add_argument(
        "--step",
        type=int,
        default=None,
        help="export this step's checkpoint (with --ema-length: this snapshot step)",
    )
    export.add_argument(
        "--ema-length",
        type=float,
        default=None,
        metavar="SIGMA_REL",
        help="instead of the recipe's EMA, the power-function EMA of this σ_rel, reconstructed "
        "by least squares from the run's post-hoc EMA snapshots (train --posthoc-ema) at "
        "their newest step or --step; prints how closely its averaging profile is matched",
    )
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from selfflow.train.export import export_run

    if args.ema_length is not None:
        from selfflow.train.posthoc import export_posthoc_ema

        exported = export_posthoc_ema(args.run, args.ema_length, args.out, step=args.step)
    else:
        exported = export_run(args.run, args.out, step=args.step)
    print(f"selfflow export: {exported.summary()}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    """Stand-alone entry point (the root ``train.py``): errors become one line, exit status 1."""
    from selfflow.cli import run_reporting_errors

    parser = configure(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLE))
    return run_reporting_errors(parser.parse_args(argv), prog)
