"""Drop-in for ADM's ``evaluations/evaluator.py``: ``python evaluator.py REF.npz SAMPLE.npz``.

Same positional arguments and the same five printed lines, computed by the selfflow package
in PyTorch (no TensorFlow). See ``selfflow evaluate --help`` for the options.
"""

from __future__ import annotations

import sys

from selfflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
