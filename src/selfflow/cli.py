"""The `selfflow` command: sample | evaluate | download | generate | prepare | train | export.

Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` on its parser; this module only
collects them, so the CLI never needs to know a subcommand's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from selfflow.errors import SelfFlowError

# (module, attribute) of each subcommand's ``add_parser``, in the order shown by --help.
_SUBCOMMANDS: tuple[str, ...] = (
    "selfflow.batch.cli",
    "selfflow.eval.cli",
    "selfflow.download",
    "selfflow.generate",
    "selfflow.data.cli",
    "selfflow.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfflow",
        description=(
            "Self-Flow ImageNet 256: sample the FID batch reproducibly on any number of GPUs, "
            "and evaluate it with ADM's metrics from ADM's own Inception graph, without TensorFlow."
        ),
    )
    from selfflow import __version__

    parser.add_argument("--version", action="version", version=f"selfflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def run_reporting_errors(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func``; a user error becomes one line on stderr and exit status 1."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SelfFlowError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_reporting_errors(args, f"selfflow {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
