"""Drop-in for ADM's ``evaluations/evaluator.py``: ``python evaluator.py REF.npz SAMPLE.npz``.

Same positional arguments and the same five printed lines, computed by the selfflow package
in PyTorch (no TensorFlow). The options are those of ``selfflow evaluate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from selfflow.cli import run_reporting_errors
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from selfflow.cli import run_reporting_errors
from selfflow.eval.cli import DESCRIPTION, configure

PROG = "evaluator.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    configure(parser)
    return run_reporting_errors(parser.parse_args(argv), PROG)


if __name__ == "__main__":
    raise SystemExit(main())
