"""Precision and recall against TensorFlow's own float16 kernels: how far apart they land.

ADM's evaluator computes its k-NN distances as ``max(|u|^2 - 2 u.v + |v|^2, 0)`` in float16
with TensorFlow's kernels. ``selfflow.eval.metrics`` rounds every step to float16 as well, but
its sums accumulate in another order than TF's, so a point on the edge of a radius can land
on the other side. This measures the effect on the metrics themselves, on random features,
for each seed and two kinds of features:

* ``pool3``: non-negative, 2048 wide, pool_3's scale (``tests.eval.references``): the float16
  grid is fine against the distances, as with real Inception features;
* ``offset``: ``1 + 0.1 N(0, 1)``, 2048 wide: every squared norm is near 2050 (float16 spacing 2)
  while the distances are near 41, so float16's cancellation swamps the distances: an
  ill-conditioned case, where ADM's float16 figure is itself far from the exact one.

Columns: precision and recall with TF's float16 kernels (ADM's expression, brute-force k-NN),
with ``selfflow.eval.metrics.precision_recall``, and with exact float64 distances; then the
largest of the two differences between selfflow and TF, between TF and float64, and between
selfflow and float64.
TensorFlow is a test-only dependency (``pip install -e ".[test]"``); run from the checkout:

    python benchmarks/pr_tensorflow.py                     # 4000 + 4000 features, 5 seeds
    python benchmarks/pr_tensorflow.py --n 1000 --seeds 1 --cases pool3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.eval: the TF side and the brute-force reference
try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT / "src"))

from selfflow.eval.metrics import precision_recall  # noqa: E402
from tests.eval import tfgraphs  # noqa: E402
from tests.eval.references import (  # noqa: E402
    gram_distances,
    knn_precision_recall,
    pool3_like_features,
)


def features(case: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference and sample features of one case; the sample set is shifted a little."""
    rng = np.random.default_rng(seed)
    if case == "pool3":
        return pool3_like_features(rng, n), pool3_like_features(rng, n, shift=0.02)
    ref = 1.0 + 0.1 * rng.standard_normal((n, 2048))
    sample = 1.0 + 0.1 * rng.normal(0.02, 1.0, (n, 2048))
    return ref.astype(np.float32), sample.astype(np.float32)


def row(case: str, seed: int, n: int) -> dict:
    """One seed of one case: the three computations' (precision, recall) and their gaps."""
    ref, sample = features(case, seed, n)
    tf16 = knn_precision_recall(ref, sample, distances=tfgraphs.float16_distances)
    ours = precision_recall(torch.from_numpy(ref), torch.from_numpy(sample))
    exact = knn_precision_recall(ref, sample, distances=gram_distances)
    return {
        "case": case,
        "seed": seed,
        "tf16": tf16,
        "selfflow": ours,
        "float64": exact,
        "selfflow_vs_tf": max(abs(a - b) for a, b in zip(ours, tf16, strict=True)),
        "tf_vs_float64": max(abs(a - b) for a, b in zip(tf16, exact, strict=True)),
        "selfflow_vs_float64": max(abs(a - b) for a, b in zip(ours, exact, strict=True)),
    }


def main() -> None:
    """Print the table (markdown) and each case's largest selfflow − TF gap."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000, help="reference and sample features each")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--cases", nargs="+", choices=["pool3", "offset"], default=["pool3", "offset"]
    )
    args = parser.parse_args()
    tf = tfgraphs.tf()
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"tensorflow {tf.__version__}; {args.n} + {args.n} features of width 2048"
    )
    print(
        "| case | seed | P, R TF float16 | P, R selfflow | P, R float64 | selfflow − TF "
        "| TF − float64 | selfflow − float64 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    started = time.perf_counter()
    for case in args.cases:
        for seed in range(args.seeds):
            r = row(case, seed, args.n)
            worst[case] = max(worst.get(case, 0.0), r["selfflow_vs_tf"])
            pairs = [
                ", ".join(f"{x:.4f}" for x in r[key]) for key in ("tf16", "selfflow", "float64")
            ]
            print(
                f"| {case} | {seed} | {' | '.join(pairs)} | "
                f"{r['selfflow_vs_tf']:.4f} | {r['tf_vs_float64']:.4f} | "
                f"{r['selfflow_vs_float64']:.4f} |",
                flush=True,
            )
    for case, value in worst.items():
        print(f"# {case}: selfflow and TF's float16 kernels differ by at most {value:.4f}")
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
