"""Drop-in for the official Self-Flow ``sample.py``: the same command lines, same npz.

    torchrun --nnodes=1 --nproc_per_node=8 sample.py --ckpt selfflow_imagenet256.pt \\
        --output-dir ./samples --num-fid-samples 50000 --batch-size 64 --num-steps 250 --mode SDE

It only parses and calls ``selfflow sample`` (see ``selfflow sample --help``).
"""

import sys
from pathlib import Path

try:
    from selfflow.batch.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from selfflow.batch.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="sample.py"))
