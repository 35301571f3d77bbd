"""``selfflow evaluate REF.npz SAMPLE.npz [OUT_DIR]``: ADM's metrics without TensorFlow."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Evaluate a sample batch against a reference batch the way ADM's evaluator does "
    "(guided-diffusion/evaluations/evaluator.py), running its TensorFlow Inception "
    "graph in PyTorch. Prints ADM's five lines; writes OUT_DIR/metrics.json when "
    "OUT_DIR is given. Reference features are cached by the reference file's sha256 "
    "under reference-features/ in $SELFFLOW_CACHE (default ~/.cache/selfflow); "
    "--no-cache skips the cache. "
    "Expected agreement with ADM's TensorFlow run: Inception features to about 1e-5 "
    "(relative), FID, sFID and Inception Score to about 1e-4 (relative). Precision and "
    "recall accumulate their float16 distance sums in another order than TensorFlow, so "
    "a borderline image can change sides: against ADM's distance expression run in "
    "TensorFlow's float16 CPU kernels they differed by at most 0.0042 on random "
    "features at pool_3's scale, and by up to 0.0835 on ill-conditioned ones "
    "(benchmarks/pr_tensorflow.py)."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, Inception Score, precision and recall, computed as ADM's evaluator does",
        description=DESCRIPTION,
    )
    configure(parser)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the evaluator's arguments to ``parser`` (``selfflow evaluate`` or ``evaluator.py``)."""
    parser.add_argument(
        "ref_batch",
        metavar="REF.npz",
        help="reference batch (arr_0 images, "
        "optionally mu/sigma/mu_s/sigma_s), e.g. `selfflow download reference`",
    )
    parser.add_argument(
        "sample_batch", metavar="SAMPLE.npz", help="sample batch: arr_0 uint8 (N, H, W, 3)"
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        nargs="?",
        default=None,
        help="directory for metrics.json (written only on success)",
    )
    parser.add_argument(
        "--inception",
        metavar="PATH",
        default=None,
        help="Inception GraphDef (default: ADM's classify_image_graph_def.pb, "
        "downloaded into the cache on first use)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per network batch (default: 64, as ADM)"
    )
    parser.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="compute the reference features again; do not read or write the feature cache",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selfflow.eval.evaluator import evaluate, format_report

    metrics = evaluate(
        args.ref_batch,
        args.sample_batch,
        out_dir=args.out_dir,
        inception=args.inception,
        device=args.device,
        batch_size=args.batch_size,
        use_cache=args.use_cache,
    )
    print(format_report(metrics), flush=True)
    return 0
