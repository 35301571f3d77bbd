"""``selfflow download``: fetch the checkpoint, the VAE, ADM's Inception graph or reference batch.

The command line only: the HTTP client and the cache checks live in :mod:`selfflow.base.download`,
the checkpoint's hub download in :mod:`selfflow.model.checkpoint`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from selfflow.base.download import (
    REFERENCE_RESOLUTIONS,
    inception_path,
    reference_path,
    verification,
)
from selfflow.base.errors import DownloadError
from selfflow.base.files import file_sha256


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch the checkpoint, the VAE, ADM's Inception graph or reference batch, or all",
        description=(
            "Download into the cache ($SELFFLOW_CACHE, else ~/.cache/selfflow; the checkpoint "
            "and the VAE go to huggingface_hub's cache, $HF_HOME) and print the file's path. "
            "Interrupted downloads resume. Every command that needs these files finds them "
            "there, so compute nodes that share the caches need no internet access."
        ),
    )
    parser.add_argument(
        "target",
        choices=TARGETS,
        help="checkpoint: the released Self-Flow weights; vae: the SD-VAE (its decoder for "
        "sampling, its encoder for selfflow prepare; huggingface_hub's cache); inception: ADM's Inception graph; reference: ADM's "
        "ImageNet reference batch (256, or --resolution 512); all: the four, so that a login "
        "node can prepare compute nodes without internet access (set HF_HUB_OFFLINE=1 there)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        choices=REFERENCE_RESOLUTIONS,
        default=256,
        help="which of ADM's reference batches: VIRTUAL_imagenet256_labeled.npz (256, the "
        "default) or VIRTUAL_imagenet512.npz (512), for evaluating samples of that size",
    )
    parser.set_defaults(func=run)


def _fetch_checkpoint() -> Path:
    """The released checkpoint, checked against the hub's sha256 when it came from the hub."""
    from selfflow.model.checkpoint import download_checkpoint

    path = download_checkpoint()
    record = verification(path, file_sha256(path) or "")
    if "DIFFERS" in str(record["how"]):
        raise DownloadError(f"{path}: sha256 {record['sha256']} {record['how']}; delete it")
    print(f"checkpoint sha256 {record['sha256']}: {record['how']}", file=sys.stderr)
    return path


def _fetch_vae() -> Path:
    from selfflow.model.vae import download_vae

    return download_vae()


TARGETS = ("checkpoint", "vae", "inception", "reference", "all")
_FETCHERS = {
    "checkpoint": _fetch_checkpoint,
    "vae": _fetch_vae,
    "inception": inception_path,
    "reference": reference_path,
}


def run(args: argparse.Namespace) -> int:
    """Fetch one target and print its path; ``all`` tries every target and lists what failed."""
    resolution = getattr(args, "resolution", 256)
    fetchers = {
        **_FETCHERS,
        "reference": functools.partial(reference_path, resolution=resolution),
    }
    if args.target != "all":
        print(fetchers[args.target]())
        return 0
    failed = []
    for name, fetch in fetchers.items():
        try:
            print(f"{name}: {fetch()}", flush=True)
        except DownloadError as error:
            failed.append(name)
            print(f"{name}: FAILED: {error}", file=sys.stderr, flush=True)
    if failed:
        raise DownloadError(f"{len(failed)} of {len(_FETCHERS)} failed: {', '.join(failed)}")
    return 0
