"""Train Self-Flow under torchrun (or as one process); the same options as ``selfflow train``.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --data latents/ --output-dir runs/xl2 \\
        --model XL/2 --steps 4000000

It only parses and calls ``selfflow train`` (see ``selfflow train --help``).
"""

import sys
from pathlib import Path

try:
    from selfflow.train.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from selfflow.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="train.py"))
