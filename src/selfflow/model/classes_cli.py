"""`selfflow classes [--ckpt CKPT] [QUERY]`: a model's classes, or those matching QUERY."""

from __future__ import annotations

import argparse

from selfflow.base.classes import find_classes
from selfflow.base.errors import ConfigurationError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classes",
        help="list a model's classes (label, WordNet id, name): ImageNet's for the released "
        "model, the training folders' for --ckpt of your own; or those matching QUERY",
        description=(
            "List a model's classes in label order: label, WordNet id ('-' for a class that is "
            "not one of ImageNet's) and name. Without --ckpt, the released model's 1000 ImageNet "
            "classes (the sorted-WordNet-id order of ImageFolder, ADM and DiT, so label i of "
            "the model); with --ckpt, the classes its card records (an export of a selfflow "
            "run: its dataset's class folders). QUERY keeps the classes whose number or "
            "WordNet id is QUERY or whose name contains it (any case). Examples: selfflow "
            "classes retriever; selfflow classes --ckpt run_ema.pt"
        ),
    )
    parser.add_argument("query", nargs="?", default=None, metavar="QUERY")
    parser.add_argument(
        "--ckpt",
        default=None,
        metavar="PATH",
        help="a checkpoint or export whose classes to list (default: the released model's)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfflow.model.checkpoint import checkpoint_classes

    classes = checkpoint_classes(args.ckpt)
    found = list(classes) if args.query is None else find_classes(args.query, classes)
    if not found:
        which = "ImageNet class" if args.ckpt is None else f"class of {args.ckpt}"
        raise ConfigurationError(
            f"no {which} matches {args.query!r} (a number 0..{len(classes) - 1}, a WordNet id "
            f"such as n01440764, or part of a name)"
        )
    for entry in found:
        print(f"{entry.index}\t{entry.wnid or '-'}\t{entry.name}")
    return 0
