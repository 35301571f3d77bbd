"""`selfflow classes [QUERY]`: the 1000 ImageNet classes, or those matching QUERY."""

from __future__ import annotations

import argparse

from selfflow.classes import find_classes, imagenet_classes
from selfflow.errors import ConfigurationError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classes",
        help="list ImageNet's classes (label, WordNet id, name), or those matching QUERY",
        description=(
            "List the 1000 ImageNet classes in label order (the sorted-WordNet-id order of "
            "ImageFolder, ADM and DiT, so label i of the model): index, WordNet id and name. "
            "QUERY keeps the classes whose number or WordNet id is QUERY or whose name contains "
            "it (any case). Example: selfflow classes retriever"
        ),
    )
    parser.add_argument("query", nargs="?", default=None, metavar="QUERY")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    found = list(imagenet_classes()) if args.query is None else find_classes(args.query)
    if not found:
        raise ConfigurationError(
            f"no ImageNet class matches {args.query!r} (a number 0..999, a WordNet id such as "
            f"n01440764, or part of a name)"
        )
    for entry in found:
        print(f"{entry.index}\t{entry.wnid}\t{entry.name}")
    return 0
