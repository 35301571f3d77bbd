"""ADM's evaluation of a sample batch against a reference batch, without TensorFlow.

``evaluate(ref, sample)`` returns the five numbers ADM prints (Inception Score, FID, sFID,
precision, recall) plus provenance; ``format_report`` gives ADM's five lines. Order of work:
check both files (cheap, before any network is loaded), load the Inception graph, get the
reference features (from the on-disk cache keyed by the reference's sha256, the graph's and
``FEATURES_REVISION`` when possible; a damaged or stale cache file is computed again), stream
the samples through the network, then compute the metrics. ``metrics.json`` is written
into OUT_DIR atomically, and only once everything has succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from selfflow.base import version
from selfflow.base.distributed import resolve_device
from selfflow.base.download import verification
from selfflow.base.errors import ConfigurationError
from selfflow.base.files import atomic_write, check_can_write, file_sha256
from selfflow.base.npz import npz_keys
from selfflow.base.precision import full_fp32
from selfflow.eval.features import (
    BATCH_SIZE,
    FEATURES_REVISION,
    Activations,
    compute_activations,
    compute_softmax,
)
from selfflow.eval.inception import InceptionV3
from selfflow.eval.metrics import (
    Statistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from selfflow.eval.npz import NpzImages, read_small_arrays, verify_batch

REPORT_KEYS = (
    ("Inception Score", "inception_score"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
)
_KINDS = ("pool", "spatial")
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def format_report(metrics: dict) -> str:
    """ADM's five lines, in ADM's order, with Python's shortest round-trip float format."""
    return "\n".join(f"{label}: {float(metrics[key])}" for label, key in REPORT_KEYS)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _statistics_from_npz(
    path: Path, role: str, dims: tuple[int, int]
) -> tuple[dict[str, Statistics], list[str]]:
    """The statistics an npz carries, validated, and the statistic keys that are ignored.

    ADM reads an npz's statistics only when it holds ``mu``, and then takes all four of
    ``mu, sigma, mu_s, sigma_s``; without ``mu`` it computes both pairs from the images and
    ignores any other statistic in the file. We do the same, but say so, and a file with ``mu``
    and not all the others is refused (ADM would stop with a KeyError).
    """
    arrays = read_small_arrays(path, list(_STAT_KEYS), role)
    if "mu" not in arrays:
        return {}, sorted(arrays, key=_STAT_KEYS.index)
    _check_statistic_keys(path, role, list(arrays))
    found: dict[str, Statistics] = {}
    for kind, (mu_key, sigma_key), dim in (
        ("pool", ("mu", "sigma"), dims[0]),
        ("spatial", ("mu_s", "sigma_s"), dims[1]),
    ):
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ConfigurationError(
                f"{role} {path}: {mu_key} {list(mu.shape)} / {sigma_key} {list(sigma.shape)} do "
                f"not fit this Inception graph's {dim} features (expected ({dim},) / ({dim}, {dim}))"
            )
        if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
            raise ConfigurationError(f"{role} {path}: {mu_key}/{sigma_key} are not floating point")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ConfigurationError(f"{role} {path}: {mu_key}/{sigma_key} contain NaN or inf")
        found[kind] = Statistics(mu, sigma)
    return found, []


def _check_statistic_keys(path: Path, role: str, keys: list[str]) -> None:
    """Refuse ``mu`` without all of ``sigma, mu_s, sigma_s``: cheap, before any features."""
    missing = [key for key in _STAT_KEYS if key not in keys]
    if "mu" in keys and missing:
        raise ConfigurationError(
            f"{role} {path} has 'mu' but no {', '.join(map(repr, missing))}: ADM's evaluator "
            f"then takes all four of mu, sigma, mu_s, sigma_s (add them, or remove 'mu' to have "
            f"the statistics computed from the images)"
        )


def _npz_or_computed(
    path: Path, role: str, acts: Activations, note
) -> tuple[dict[str, Statistics], bool]:
    """ADM's statistics for one batch: the file's four arrays when it has ``mu``, else computed
    from its features. Returns them and whether they came from the file."""
    dims = (acts.pool.shape[1], acts.spatial.shape[1])
    stats, ignored = _statistics_from_npz(path, role, dims)
    if stats:
        note(f"{role} {path.name} carries mu/sigma/mu_s/sigma_s; used as is (as ADM does)")
        return stats, True
    if ignored:
        note(
            f"{role} {path.name} has {'/'.join(ignored)} but no mu; ADM then ignores them, and "
            f"so do we"
        )
    if role == "reference batch" or ignored:
        note(f"{role} {path.name}: mu/sigma/mu_s/sigma_s computed from its {len(acts)} images")
    stats = {kind: compute_statistics(getattr(acts, kind)) for kind in _KINDS}
    return stats, False


def _reference_cache_path(ref_sha: str, graph_sha: str | None) -> Path:
    from selfflow.base.cache import cache_dir

    graph_part = (graph_sha or "unknown")[:16]
    name = f"{ref_sha}-{graph_part}-r{FEATURES_REVISION}.npz"
    return cache_dir() / "reference-features" / name


def _load_cached(path: Path, count: int, pool_dim: int) -> tuple[Activations | None, str | None]:
    """Cached reference features, or ``None`` and why the file cannot be used (``None``: none)."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as cached:
            revision = int(cached["revision"])
            pool, spatial = cached["pool"], cached["spatial"]
    except MemoryError:
        raise
    except Exception as error:  # whatever damaged bytes make np.load raise
        return None, f"damaged: {type(error).__name__}: {error}"
    if revision != FEATURES_REVISION:
        return None, f"features revision {revision}, this selfflow computes {FEATURES_REVISION}"
    for name, array in (("pool", pool), ("spatial", spatial)):
        if array.dtype != np.float32 or array.ndim != 2 or len(array) != count:
            return None, (
                f"{name} is {array.dtype} {list(array.shape)}; expected float32 ({count}, D)"
            )
        if not np.isfinite(array).all():
            return None, f"{name} holds NaN or inf"
    if pool.shape[1] != pool_dim:
        return None, f"{pool.shape[1]} pool features; this graph gives {pool_dim}"
    return Activations(pool, spatial), None


def _save_cached(path: Path, acts: Activations) -> None:
    atomic_write(
        path,
        lambda handle: np.savez(
            handle, revision=np.array(FEATURES_REVISION), pool=acts.pool, spatial=acts.spatial
        ),
    )


def _write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"  # before the file: no half file
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def evaluate(
    ref_path: str | os.PathLike,
    sample_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = BATCH_SIZE,
    *,
    progress: bool = True,
    use_cache: bool = True,
) -> dict:
    """Evaluate ``sample_path`` against ``ref_path`` as ADM's evaluator does.

    Returns a dict with ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall``,
    counts, the inputs' sha256 and any notes. With ``out_dir`` it also writes
    ``OUT_DIR/metrics.json`` (only on success). ``inception`` is the GraphDef path; by default
    ADM's graph is taken from (or downloaded into) the cache.
    """
    started = time.time()
    ref_path, sample_path = Path(ref_path), Path(sample_path)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        check_can_write(out_path, f"OUT_DIR {out_path}")  # now, not after the features
    _check_batch_size(batch_size)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        _log(f"note: {message}")

    references, samples = _open_inputs(ref_path, sample_path, progress)
    dev = resolve_device(None if device is None else str(device))

    # The network.
    inception = inception if inception is not None else _cached_inception()
    model = InceptionV3(inception, device=dev)
    with _hashed_meanwhile(sample_path) as sample_sha:
        ref_sha = file_sha256(ref_path)
        ref_acts, cached = _reference_features(
            model, references, ref_sha, batch_size, progress, use_cache, note
        )
        ref_stats, ref_source = _statistics(ref_path, "reference batch", ref_acts, note)
        sample_acts = compute_activations(model, samples, batch_size, "samples", progress)
        sample_stats, sample_source = _statistics(sample_path, "sample batch", sample_acts, note)

        metrics_time = time.time()
        values = _metrics(
            model, ref_acts, sample_acts, ref_stats, sample_stats, dev, progress, notes
        )
        metrics_time = time.time() - metrics_time
        for key in [k for k, v in values.items() if not np.isfinite(v)]:
            note(f"{key} is {values[key]} (ADM would print the same); metrics.json stores null")
        sample_digest = sample_sha.result()

    result = {
        **values,
        "num_samples": len(samples),
        "num_reference": len(references),
        "sample": _input_record(sample_path, sample_digest, samples, sample_source),
        "reference": {
            **_input_record(ref_path, ref_sha, references, ref_source),
            "features_cached": cached,
            "features_revision": FEATURES_REVISION,
            "integrity": verification(ref_path, ref_sha),
        },
        "inception": {
            "path": str(inception),
            "sha256": model.sha256,
            "integrity": verification(inception, model.sha256) if model.sha256 else None,
        },
        "device": str(dev),
        "batch_size": batch_size,
        "seconds": {"total": round(time.time() - started, 3), "metrics": round(metrics_time, 3)},
        "notes": notes,
        "selfflow_version": version.__version__,
    }
    if out_path is not None:
        _write_json_atomic(out_path / "metrics.json", _json_safe(result))
    return result


def _cached_inception() -> Path:
    """ADM's Inception graph from the cache (downloaded into it when missing)."""
    from selfflow.base.download import inception_path

    return inception_path()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigurationError(f"batch size must be at least 1, got {batch_size}")


@contextlib.contextmanager
def _hashed_meanwhile(path: Path) -> Iterator[Future]:
    """The sha256 of ``path``, computed in a thread while the block runs (a Future).

    On an error in the block the hash stops within one chunk instead of reading on.
    """
    hasher = ThreadPoolExecutor(max_workers=1)
    stop_hashing = threading.Event()
    try:
        yield hasher.submit(file_sha256, path, stop=stop_hashing)
    finally:
        stop_hashing.set()  # no-op after success
        hasher.shutdown(wait=True, cancel_futures=True)


def _statistics(path: Path, role: str, acts, note) -> tuple[dict, dict]:
    """The batch's statistics (from its file, else computed) and where each kind came from."""
    stats, from_file = _npz_or_computed(path, role, acts, note)
    return stats, {kind: "file" if from_file else "computed" for kind in _KINDS}


def _input_record(path: Path, sha256: str, images: NpzImages, statistics: dict) -> dict:
    """What metrics.json says about one input batch."""
    return {
        "path": str(path),
        "sha256": sha256,
        "num_images": len(images),
        "image_shape": list(images.shape[1:]),
        "statistics": statistics,
    }


def _open_inputs(ref_path: Path, sample_path: Path, progress: bool) -> tuple[NpzImages, NpzImages]:
    """Check both inputs before anything expensive; returns (references, samples)."""
    if not ref_path.is_file():
        raise ConfigurationError(f"reference batch {ref_path} does not exist")
    ref_keys = npz_keys(ref_path)
    if "arr_0" not in ref_keys:
        raise ConfigurationError(
            f"reference batch {ref_path} has no array 'arr_0' (found "
            f"{', '.join(map(repr, ref_keys)) or 'no arrays'}); ADM's precision/recall need the "
            f"reference images (uint8, (N, H, W, 3))"
        )
    references = NpzImages(ref_path, role="reference batch")
    samples = NpzImages(sample_path, role="sample batch")
    verify_batch(sample_path, "sample batch", progress)
    _check_statistic_keys(ref_path, "reference batch", ref_keys)
    _check_statistic_keys(sample_path, "sample batch", npz_keys(sample_path))
    return references, samples


def _reference_features(model, references, ref_sha, batch_size, progress, use_cache, note):
    """The reference features, cached by the reference file's sha256 (and the graph's).

    Returns ``(activations, from_cache)``; a cache that cannot be used or written is noted,
    never fatal.
    """
    cache_path = _reference_cache_path(ref_sha, model.sha256)
    ref_acts, unusable = None, None
    if use_cache:
        pool_dim = model.softmax_weight.shape[0]
        ref_acts, unusable = _load_cached(cache_path, len(references), pool_dim)
    if unusable:
        note(f"reference feature cache {cache_path} is unusable ({unusable}); recomputing")
        try:
            cache_path.unlink()
        except OSError as error:
            note(f"could not delete {cache_path}: {error}")
    if ref_acts is not None:
        _log(f"reference features from cache {cache_path}")
        return ref_acts, True
    ref_acts = compute_activations(model, references, batch_size, "reference", progress)
    if use_cache:
        try:
            _save_cached(cache_path, ref_acts)
        except OSError as error:
            note(
                f"reference features not cached: {cache_path.parent} cannot be written "
                f"({error.strerror or error}); the next evaluation computes them again"
            )
    return ref_acts, False


def _metrics(model, ref_acts, sample_acts, ref_stats, sample_stats, dev, progress, notes) -> dict:
    """ADM's five numbers from the two feature sets.

    A non-finite value is returned as it comes, as ADM prints it (a class probability that
    underflows to 0 in float32 makes the IS NaN); the caller notes it.
    """
    _log("computing the Inception Score...")
    is_value = inception_score(compute_softmax(model, sample_acts.pool))
    _log("computing FID (matrix square root of the pool covariances)...")
    fid = frechet_distance(sample_stats["pool"], ref_stats["pool"], notes=notes)
    _log("computing sFID (matrix square root of the spatial covariances)...")
    sfid = frechet_distance(sample_stats["spatial"], ref_stats["spatial"], notes=notes)
    _log("computing precision and recall (k = 3 nearest neighbours, float16 distances)...")
    with full_fp32():
        precision, recall = precision_recall(
            torch.from_numpy(ref_acts.pool).to(dev),
            torch.from_numpy(sample_acts.pool).to(dev),
            progress=progress,
        )
    return {
        "inception_score": is_value,
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
    }


def _json_safe(value):
    """Strict JSON: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
