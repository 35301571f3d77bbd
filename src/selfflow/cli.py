"""The `selfflow` command: sample | evaluate | download | generate | classes | prepare | train | export | sweep.

Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` on its parser; this module only
collects them, so the CLI never needs to know a subcommand's options.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from selfflow.base.errors import SelfFlowError

# (module, attribute) of each subcommand's ``add_parser``, in the order shown by --help.
_SUBCOMMANDS: tuple[str, ...] = (
    "selfflow.batch.cli",
    "selfflow.eval.cli",
    "selfflow.download_cli",
    "selfflow.sampling.generate_cli",
    "selfflow.model.classes_cli",
    "selfflow.data.cli",
    "selfflow.train.cli",
    "selfflow.research.sweep_cli",
    "selfflow.research.probe_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfflow",
        description=(
            "Self-Flow ImageNet 256: sample the FID batch reproducibly on any number of GPUs, "
            "evaluate it with ADM's metrics from ADM's own Inception graph, without TensorFlow, "
            "and train (prepare a latent dataset, train, export the EMA)."
        ),
    )
    from selfflow.base.version import __version__

    parser.add_argument("--version", action="version", version=f"selfflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``timeout``, ``kill``), raised in the main thread.

    A subclass of KeyboardInterrupt, so every ``finally`` and ``except BaseException`` that
    cleans up after Ctrl-C (the folder lock, the background writer, temporaries) runs for it too;
    without a handler, SIGTERM ends Python at once and skips them all.
    """


def _terminate(signum, frame) -> None:
    raise Terminated


def run_reporting_errors(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func``; a user error, or the file system refusing a write, becomes one line
    on stderr and exit status 1.

    Ctrl-C and SIGTERM end the command the same way: what is finished is kept and the rerun
    continues, which the message says; the exit status is 130 or 143 (128 + the signal), as
    the shell and schedulers expect.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(
            f"{prog}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; what was "
            f"finished is kept: rerun the same command to continue",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except SelfFlowError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        # a write the code did not guard (a folder, a lock, a log line): the file system's
        # refusal (read-only, full, quota, permission) is still one line naming the file
        from selfflow.base.files import write_failure

        failure = write_failure(None, error)
        if failure is None:
            raise
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_reporting_errors(args, f"selfflow {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
