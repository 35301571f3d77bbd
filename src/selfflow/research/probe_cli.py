"""``selfflow probe CKPT --data DIR [--layer L ...] [--tau T ...] [--out probe.json]``.

Everything that can be wrong is checked before any feature is computed: the checkpoint loads
strictly, the dataset's latent shape and classes are the model's, every layer is a block of
it, every τ lies inside (0, 1), the split leaves rows on both sides, and ``--out`` can be
written. Every process checks the same things and all stop together when one fails.

It runs on any process count (torchrun, or srun with one task per GPU): each process computes
the features of its share of the batches, rank 0 gathers them in row order, fits the classifiers
and alone prints and writes; the features are keyed by row, so the figures are one process's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfflow.base.errors import ConfigurationError, SelfFlowError
from selfflow.options import add_options

DEFAULT_LAYER_FRACTION = 0.3  # the student's block in Self-Flow (8 of 28)
DEFAULT_TAU = 0.5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe accuracy of a block's features (null label, fixed noise) on "
        "held-out images of a latent dataset",
        description=(
            "How linearly readable are the classes in a block's output? Each image of a "
            "latent dataset is noised to level tau (1 = pure noise) with noise keyed by its "
            "row, run through the network up to block L with the NULL label (the class cannot "
            "leak in through the conditioning), and its block output is averaged over the "
            "tokens. A multinomial logistic regression (torch, L-BFGS, float64) fitted on "
            "one part of the rows names the classes of the held-out part; its accuracy is "
            "printed, one row per (layer, tau). Runs on one GPU, the CPU, or any number of "
            "processes (torchrun, srun tasks): the features are computed in shares and the "
            "figures are the same on any process count. "
            "Example: selfflow probe run_ema.pt --data latents --layer 2 4 --tau 0.3 0.7"
        ),
    )
    parser.add_argument("ckpt", metavar="CKPT", help="a checkpoint or export (loaded strictly)")
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="a latent dataset of the model's classes"
    )
    parser.add_argument(
        "--layer",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="1-based block number(s) (default: round(0.3 x depth), Self-Flow's student block)",
    )
    parser.add_argument(
        "--tau",
        type=float,
        nargs="+",
        default=[DEFAULT_TAU],
        metavar="T",
        help="noise level(s) strictly inside (0, 1), paper time: 1 = noise (default: 0.5)",
    )
    parser.add_argument("--out", default=None, metavar="JSON", help="write the results here")
    split = parser.add_argument_group("rows")
    split.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of --data's rows held out to score the classifier, chosen by --seed "
        "(default: %(default)s)",
    )
    split.add_argument(
        "--test-data",
        default=None,
        metavar="DIR",
        help="score on this dataset instead (e.g. one from another split); the classifier "
        "then trains on every row of --data",
    )
    split.add_argument(
        "--seed",
        type=int,
        default=0,
        help="keys the split, each row's noise and posterior draw (default: %(default)s)",
    )
    run_options = parser.add_argument_group("running")
    add_options(
        run_options, "--device", help={"--device": "torch device (default: cuda if available)"}
    )
    run_options.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="images per forward pass, in each process (default: 256)",
    )
    run_options.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_dataset_fits(dataset, model, what: str = "--data") -> None:
    """The dataset's latents are the model's input (shape, and the latent space its card
    records) and its classes are the model's first ones."""
    from selfflow.research.probe import model_convention

    config, card = model.config, model.checkpoint_info.card
    expected = (config.in_channels, config.input_size, config.input_size)
    if tuple(dataset.latent_shape) != expected:
        raise ConfigurationError(
            f"{what} {dataset.root} holds latents of shape {tuple(dataset.latent_shape)}; "
            f"the model takes {expected}"
        )
    model_convention(model, dataset, what)
    from selfflow.base.classes import classes_from_names

    theirs = [(c.wnid, c.name) for c in classes_from_names(dataset.class_names)]
    ours = [(c.wnid, c.name) for c in card.classes(config.num_classes)][: len(theirs)]
    if len(theirs) > config.num_classes or theirs != ours:
        first = next(
            (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), len(ours)
        )
        found = theirs[first][1] if first < len(theirs) else "(none)"
        wanted = ours[first][1] if first < len(ours) else "(none)"
        raise ConfigurationError(
            f"{what} {dataset.root} has {len(theirs)} classes that are not the model's "
            f"{config.num_classes}: label {first} is {found!r} there and {wanted!r} in the model"
        )


@dataclass
class _Request:
    """What every process loaded and checked before any feature is computed."""

    model: Any
    layers: list[int]
    dataset: Any
    test_dataset: Any
    train_rows: Any
    test_rows: Any


def _prepare(args: argparse.Namespace, context) -> _Request:
    import numpy as np

    from selfflow.base.files import check_can_write
    from selfflow.data import LatentDataset
    from selfflow.model.checkpoint import load_model
    from selfflow.research.probe import check_probe_request, split_rows

    if args.batch_size < 1:
        raise ConfigurationError(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.out is not None and context.is_main:  # only rank 0 writes it
        if Path(args.out).is_dir():
            raise ConfigurationError(f"--out must be a JSON file; {args.out} is a folder")
        check_can_write(Path(args.out).resolve().parent, f"--out {args.out}")
    model = load_model(args.ckpt, device=context.device)
    layers = args.layer or [max(1, round(DEFAULT_LAYER_FRACTION * model.config.depth))]
    # a value named twice is one row: the table and the record hold each (layer, tau) once
    layers, args.tau = list(dict.fromkeys(layers)), list(dict.fromkeys(args.tau))
    check_probe_request(model, layers, args.tau)
    dataset = LatentDataset(args.data)
    check_dataset_fits(dataset, model)
    test_dataset = None
    if args.test_data is not None:
        test_dataset = LatentDataset(args.test_data)
        check_dataset_fits(test_dataset, model, "--test-data")
        if test_dataset.identity == dataset.identity:
            raise ConfigurationError(
                f"--test-data is --data itself: {args.test_data} holds the same data "
                f"(identity {dataset.identity}) as {args.data}, so the classifier would be "
                f"scored on its own training rows; give a held-out split, or leave --test-data "
                f"out to hold out --test-fraction of --data"
            )
        if test_dataset.class_names != dataset.class_names:
            raise ConfigurationError(
                f"--test-data {args.test_data} names other classes than --data {args.data}"
            )
        train_rows, test_rows = np.arange(len(dataset)), np.arange(len(test_dataset))
    else:
        train_rows, test_rows = split_rows(len(dataset), args.test_fraction, args.seed)
    return _Request(model, layers, dataset, test_dataset, train_rows, test_rows)


def _agreed(args: argparse.Namespace, context) -> _Request | None:
    """:func:`_prepare` on every process, and every process learns whether all succeeded:
    rank 0 raises the first failure (one line), the others return None and stop quietly."""
    from selfflow.base import distributed

    try:
        request = _prepare(args, context)
    except SelfFlowError as error:
        distributed.all_gather_objects(context, str(error))
        if context.is_main:
            raise
        return None
    failed = [message for message in distributed.all_gather_objects(context, None) if message]
    if failed and context.is_main:
        raise SelfFlowError(failed[0])
    return None if failed else request


def run(args: argparse.Namespace) -> int:
    from selfflow.base import distributed

    with distributed.session(args.device) as context:
        request = _agreed(args, context)
        if request is None:
            return 1  # rank 0 reports why
        return _probe(args, context, request)


def _probe(args: argparse.Namespace, context, request: _Request) -> int:
    from selfflow.base.files import file_sha256
    from selfflow.research.probe import DEFAULT_C, run_probe

    dataset, test_dataset = request.dataset, request.test_dataset
    train_rows, test_rows = request.train_rows, request.test_rows
    # rank 0's bar counts its own share of the images (every process has one of about the size)
    share = -(-(len(train_rows) + len(test_rows)) // context.world_size)
    results = _with_progress(
        args if context.is_main else argparse.Namespace(no_progress=True), share,
        lambda advance: run_probe(
            request.model, dataset, request.layers, args.tau, seed=args.seed,
            train_rows=train_rows, test_rows=test_rows, test_dataset=test_dataset,
            batch_size=args.batch_size, advance=advance, context=context,
        ),
    )  # fmt: skip
    if results is None:
        return 0  # not rank 0: rank 0 fits, prints and writes
    report = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "checkpoint_sha256": file_sha256(args.ckpt),
        "data": str(Path(args.data).resolve()),
        "data_identity": dataset.identity,
        "test_data": None if test_dataset is None else str(Path(args.test_data).resolve()),
        "seed": args.seed,
        "processes": context.world_size,
        "split": {
            "train": len(train_rows),
            "test": len(test_rows),
            "test_fraction": None if test_dataset is not None else args.test_fraction,
        },
        "label": "null",
        "features": "block output, mean over tokens",
        "classifier": {"kind": "multinomial logistic regression, L-BFGS, float64", "C": DEFAULT_C},
        "num_classes": dataset.num_classes,
        "results": [result.to_dict() for result in results],
    }
    if len(results) == 1:
        report.update({k: results[0].to_dict()[k] for k in ("accuracy", "layer", "tau")})
    print(format_table(results, report), flush=True)
    if args.out is not None:
        _write_json(Path(args.out), report)
        print(f"selfflow probe: wrote {args.out}", flush=True)
    return 0


def _with_progress(args: argparse.Namespace, total: int, work):
    """``work(advance)`` under a progress bar counting images (rate and ETA) on a terminal."""
    if args.no_progress or not sys.stderr.isatty():
        return work(None)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="probe features", unit="img", dynamic_ncols=True) as bar:
        return work(bar.update)


def format_table(results, report: dict) -> str:
    split = report["split"]
    lines = [
        f"linear probe, null label, seed {report['seed']}: {split['train']} training rows, "
        f"{split['test']} test rows, {report['num_classes']} classes "
        f"(chance {1 / report['num_classes']:.1%})",
        "| layer | tau | test accuracy | train accuracy |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.layer} | {r.tau:g} | {r.accuracy:.1%} | {r.train_accuracy:.1%} |")
    return "\n".join(lines)


def _write_json(path: Path, report: dict) -> None:
    from selfflow.base.files import atomic_write

    atomic_write(path, lambda handle: handle.write((json.dumps(report, indent=2) + "\n").encode()))
