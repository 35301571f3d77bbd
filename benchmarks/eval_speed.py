"""Evaluator speed: images/s of Inception feature extraction, and seconds for each metric.

Feature extraction runs the GraphDef op by op in PyTorch (float32, TF32 off), on uint8
256 x 256 images like a sample batch. The network is, in order of preference:

* ``--inception PATH``: ADM's ``classify_image_graph_def.pb`` (the real thing);
* ``--synthetic``: a random-weight graph with the real graph's structure and shapes
  (``width 1.0``: 2048 pool features, same cost per image), no download needed;
* ``--tiny``: the same structure at 1/8 width: seconds on a CPU, for CI and smoke tests.

Metrics are timed on random features with the network's dimensions: statistics, FID (pool),
sFID (spatial; both dominated by scipy's sqrtm), IS, and precision/recall (float16 distance
blocks on the device). ``--samples``/``--reference`` set their sizes (ADM: 50 000 / 10 000).

    python benchmarks/eval_speed.py --tiny --device cpu
    python benchmarks/eval_speed.py --inception classify_image_graph_def.pb --samples 50000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.base.precision import full_fp32
from selfflow.eval.graphdef import TFGraph
from selfflow.eval.inception import InceptionV3
from selfflow.eval.metrics import (
    compute_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from selfflow.eval.synthetic import inception_like_graph


def log(message: str) -> None:
    print(f"[eval_speed] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Each help text states its own default (some depend on the device), so argparse's
    # ArgumentDefaultsHelpFormatter, which would print a second "(default: None)", is not used.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--inception", metavar="PATH", help="ADM's Inception GraphDef")
    which.add_argument("--synthetic", action="store_true", help="random graph, real shapes")
    which.add_argument("--tiny", action="store_true", help="random graph at 1/8 width")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument(
        "--batches", type=int, default=None, help="timed batches (default: 20 on a GPU, 3 on a CPU)"
    )
    p.add_argument(
        "--image-size", type=int, default=256, help="side of the square images (default: 256)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="sample features for the metrics (default: 50000 on a GPU, 5000 on a CPU)",
    )
    p.add_argument(
        "--reference",
        type=int,
        default=None,
        help="reference features (default: 10000 on a GPU, 2000 on a CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 avoids OpenMP "
        "stalls on a CPU shared with other jobs",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_features(model: InceptionV3, args, device) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    batch = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    with full_fp32():
        model.features(batch)  # warm-up: kernels, allocator, first-shape overheads
        sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            pool, spatial = model.features(batch)
        sync(device)
        seconds = time.perf_counter() - start
    images = args.batches * args.batch_size
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "pool_dim": pool.shape[1],
        "spatial_dim": spatial.shape[1],
    }


def time_metrics(model: InceptionV3, dims: tuple[int, int], args, device) -> dict:
    rng = np.random.default_rng(0)

    # Non-negative, correlated features like pool_3's (post-ReLU averages).
    def features(n: int, dim: int, shift: float) -> np.ndarray:
        mix = rng.normal(0, 1 / np.sqrt(dim), (dim, dim)).astype(np.float32)
        return np.abs(rng.normal(shift, 1, (n, dim)).astype(np.float32) @ mix)

    times: dict[str, float] = {}

    def timed(name, fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = time.perf_counter() - start
        log(f"{name}: {times[name]:.2f} s")
        return out

    sample_pool = features(args.samples, dims[0], 0.1)
    ref_pool = features(args.reference, dims[0], 0.0)
    sample_spatial = features(args.samples, dims[1], 0.1)
    ref_spatial = features(args.reference, dims[1], 0.0)
    stats = timed(
        "statistics (4 sets)",
        lambda: [
            compute_statistics(a) for a in (sample_pool, ref_pool, sample_spatial, ref_spatial)
        ],
    )
    timed("FID (sqrtm, pool)", lambda: frechet_distance(stats[0], stats[1]))
    timed("sFID (sqrtm, spatial)", lambda: frechet_distance(stats[2], stats[3]))

    def softmax_and_is():
        with full_fp32():
            probs = model.softmax(torch.from_numpy(sample_pool)).cpu().numpy()
        return inception_score(probs)

    timed("IS (softmax + splits)", softmax_and_is)

    def pr():
        with full_fp32():
            return precision_recall(
                torch.from_numpy(ref_pool).to(device), torch.from_numpy(sample_pool).to(device)
            )

    timed("precision/recall", pr)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    args.batches = args.batches or (20 if on_gpu else 3)
    args.samples = args.samples or (50_000 if on_gpu else 5000)
    args.reference = args.reference or (10_000 if on_gpu else 2000)
    if args.inception:
        graph, name = TFGraph.load(args.inception), Path(args.inception).name
    else:
        width = 1.0 if args.synthetic else 0.125
        log(f"building a synthetic Inception-shaped graph at width {width}")
        graph = TFGraph.from_bytes(inception_like_graph(width=width), source=f"synthetic-{width}")
        name = f"synthetic (width {width})"
    model = InceptionV3(graph, device=device)
    log(
        f"network {name} on {device}; {args.batches} x {args.batch_size} images "
        f"of {args.image_size} px"
    )
    feats = time_features(model, args, device)
    log(f"features: {feats['images_per_s']:.1f} images/s")
    metrics = time_metrics(model, (feats["pool_dim"], feats["spatial_dim"]), args, device)

    machine = (
        torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine()
    )
    threads = torch.get_num_threads()
    print(
        f"\nEvaluator speed: {name}, {device} ({machine}, {threads} CPU threads), torch {torch.__version__}\n"
    )
    print("| stage | size | time | rate |")
    print("|---|---|---|---|")
    print(
        f"| features | {feats['images']} images, batch {args.batch_size}, {args.image_size} px "
        f"| {feats['seconds']:.2f} s | {feats['images_per_s']:.1f} images/s |"
    )
    for stage, seconds in metrics.items():
        size = (
            f"{args.samples} vs {args.reference}"
            if "precision" in stage or "FID" in stage
            else f"{args.samples}"
        )
        print(f"| {stage} | {size} | {seconds:.2f} s | |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"network": name, "device": str(device), "features": feats, "metrics_s": metrics},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
