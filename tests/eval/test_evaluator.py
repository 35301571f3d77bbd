"""The whole evaluation: against TensorFlow features and float64 metrics; bad input; files.

The network here is the Inception structure at minimal width resizing to 75 pixels (66 pool
features, 3 x 3 x 7 = 63 spatial features): the same code path as ADM's graph, at a size where
a covariance is full rank with 120 images and a whole evaluation takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.cli import main
from selfflow.eval.evaluator import evaluate, format_report
from selfflow.eval.features import compute_activations
from selfflow.eval.npz import NpzImages
from tests.eval import tfgraphs
from tests.eval.references import (
    fid_by_eigendecomposition,
    float16_distances_numpy,
    inception_score_float64,
    knn_precision_recall,
)

REPO = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(77)


def make_images(n: int, size: int, seed: int) -> np.ndarray:
    """Noise plus smooth structure, so features vary from image to image."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        a, b, c = g.uniform(1, 8, 3)
        smooth = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx * c), np.sin(c * yy)], -1)
        noise = g.normal(0, g.uniform(0.05, 0.6), (size, size, 3))
        images.append(np.clip(127.5 + 100 * (smooth + noise), 0, 255))
    return np.asarray(images).astype(np.uint8)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    ref_images, sample_images = make_images(120, 32, 1), make_images(100, 48, 2)
    np.savez(root / "ref.npz", arr_0=ref_images)
    np.savez(root / "sample.npz", arr_0=sample_images)
    return root / "ref.npz", root / "sample.npz", ref_images, sample_images


@pytest.fixture(scope="module")
def tf_features(batches, inception_small):
    """ADM-in-TensorFlow features of both batches: the independent side of the comparison."""
    _, _, ref_images, sample_images = batches
    data = inception_small.read_bytes()
    return tfgraphs.adm_features(data, ref_images), tfgraphs.adm_features(data, sample_images)


def stats64(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = acts.astype(np.float64)
    centred = x - x.mean(axis=0)
    return x.mean(axis=0), centred.T @ centred / (len(x) - 1)


def run(ref, sample, graph, out=None, **kwargs) -> dict:
    return evaluate(ref, sample, out, inception=graph, device="cpu", progress=False, **kwargs)


# --- results ----------------------------------------------------------------------------------


def test_evaluation_matches_tensorflow_features_and_float64_metrics(
    batches, tf_features, inception_small, tmp_path
):
    ref, sample, ref_images, sample_images = batches
    out = tmp_path / "out"
    result = run(ref, sample, inception_small, out, batch_size=7)  # 7 does not divide 120 or 100
    (ref_pool, ref_spatial, _), (pool, spatial, softmax) = tf_features
    assert pool.shape == (100, 66) and spatial.shape == (100, 63)

    fid = fid_by_eigendecomposition(*stats64(pool), *stats64(ref_pool))
    sfid = fid_by_eigendecomposition(*stats64(spatial), *stats64(ref_spatial))
    assert result["fid"] == pytest.approx(fid, rel=1e-4)
    assert result["sfid"] == pytest.approx(sfid, rel=1e-4)
    assert result["inception_score"] == pytest.approx(inception_score_float64(softmax), rel=1e-4)
    # P/R: ADM's float16 distances, here in numpy float16, then brute-force k-NN. (These tiny
    # features have squared norms near 1.7 and distances near 0.2, so float16 cancellation moves
    # several points against float64: that is ADM's arithmetic, reproduced, not an error.)
    precision, recall = knn_precision_recall(ref_pool, pool, distances=float16_distances_numpy)
    assert abs(result["precision"] - precision) <= 1 / 100
    assert abs(result["recall"] - recall) <= 1 / 120
    assert 0 < result["precision"] < 1 and result["inception_score"] > 1.03

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["sample"]["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert saved["reference"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert saved["inception"]["sha256"] == hashlib.sha256(inception_small.read_bytes()).hexdigest()
    assert (saved["num_samples"], saved["num_reference"]) == (100, 120)
    assert saved["sample"]["image_shape"] == [48, 48, 3]
    assert [p.name for p in out.iterdir()] == ["metrics.json"]  # no temporary left behind
    # No statistics in the reference: computed from its images, and said so.
    assert saved["reference"]["statistics"] == {"pool": "computed", "spatial": "computed"}
    assert any("mu/sigma/mu_s/sigma_s computed from its 120 images" in n for n in saved["notes"])


def test_statistics_in_the_npz_are_used_as_is(batches, tf_features, inception_small, tmp_path):
    ref, sample, ref_images, _ = batches
    (ref_pool, ref_spatial, _), (pool, spatial, _) = tf_features
    # Reference statistics from *other* features: the FID must follow the file, not arr_0.
    mu, sigma = stats64(ref_pool[::2] * 1.1 + 0.05)
    mu_s, sigma_s = stats64(ref_spatial[1::2])
    with_stats = tmp_path / "ref_stats.npz"
    np.savez(with_stats, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    result = run(with_stats, sample, inception_small)
    assert result["fid"] == pytest.approx(
        fid_by_eigendecomposition(*stats64(pool), mu, sigma), rel=1e-4
    )
    assert result["sfid"] == pytest.approx(
        fid_by_eigendecomposition(*stats64(spatial), mu_s, sigma_s), rel=1e-4
    )
    assert result["reference"]["statistics"] == {"pool": "file", "spatial": "file"}
    assert not any("has no" in n for n in result["notes"])


def test_sample_statistics_follow_adms_rule(batches, tf_features, inception_small, tmp_path):
    """ADM takes a sample npz's mu, sigma, mu_s, sigma_s only when 'mu' is there."""
    ref, sample, _, sample_images = batches
    (ref_pool, ref_spatial, _), (pool, spatial, _) = tf_features
    plain = run(ref, sample, inception_small)
    # All four: FID and sFID follow the file, not arr_0; IS and P/R still come from the images.
    mu, sigma = stats64(pool[::2] * 0.9 + 0.1)
    mu_s, sigma_s = stats64(spatial[1::2])
    with_stats = _save(
        tmp_path / "all_four.npz",
        arr_0=sample_images,
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
    )
    result = run(ref, with_stats, inception_small)
    assert result["fid"] == pytest.approx(
        fid_by_eigendecomposition(mu, sigma, *stats64(ref_pool)), rel=1e-4
    )
    assert result["sfid"] == pytest.approx(
        fid_by_eigendecomposition(mu_s, sigma_s, *stats64(ref_spatial)), rel=1e-4
    )
    assert abs(result["fid"] - plain["fid"]) > 0.01 * plain["fid"]
    for key in ("inception_score", "precision", "recall"):
        assert result[key] == plain[key]
    assert result["sample"]["statistics"] == {"pool": "file", "spatial": "file"}
    # Spatial statistics without 'mu' are ignored: both pairs come from the images.
    spatial_only = _save(tmp_path / "spatial.npz", arr_0=sample_images, mu_s=mu_s, sigma_s=sigma_s)
    result = run(ref, spatial_only, inception_small)
    assert (result["fid"], result["sfid"]) == (plain["fid"], plain["sfid"])
    assert result["sample"]["statistics"] == {"pool": "computed", "spatial": "computed"}
    assert any("has mu_s/sigma_s but no mu; ADM then ignores them" in n for n in result["notes"])
    # 'mu' without the other three: refused before any features are computed.
    partial = _save(tmp_path / "partial.npz", arr_0=sample_images, mu=mu, sigma=sigma)
    with pytest.raises(ConfigurationError, match="has 'mu' but no 'mu_s', 'sigma_s'"):
        evaluate(ref, partial, inception=tmp_path / "no-graph-needed.pb", device="cpu")


def test_reference_features_are_cached_by_sha256(batches, inception_small, tmp_path):
    ref, sample, ref_images, _ = batches
    first = run(ref, sample, inception_small)
    assert first["reference"]["features_cached"] is False
    ref_sha = hashlib.sha256(ref.read_bytes()).hexdigest()
    cache = list((tmp_path / "cache" / "reference-features").glob("*.npz"))
    assert len(cache) == 1 and cache[0].name.startswith(ref_sha)
    second = run(ref, sample, inception_small)
    assert second["reference"]["features_cached"] is True
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert second[key] == first[key]
    # Another file with the same name is a different reference: no stale cache.
    other = tmp_path / "ref.npz"
    np.savez(other, arr_0=ref_images[::-1])
    assert run(other, sample, inception_small)["reference"]["features_cached"] is False


def test_cache_files_are_checked_on_load(tmp_path):
    from selfflow.eval.evaluator import _load_cached, _save_cached
    from selfflow.eval.features import FEATURES_REVISION, Activations

    pool = rng.normal(size=(10, 6)).astype(np.float32)
    spatial = rng.normal(size=(10, 4)).astype(np.float32)
    path = tmp_path / "features.npz"
    assert _load_cached(path, 10, 6) == (None, None)  # no file: nothing to say
    _save_cached(path, Activations(pool, spatial))
    loaded, why = _load_cached(path, 10, 6)
    assert why is None and np.array_equal(loaded.pool, pool)
    assert np.array_equal(loaded.spatial, spatial)
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], good[:-30], b"", b"not a zip file" * 50):
        path.write_bytes(damaged)
        assert _load_cached(path, 10, 6)[1].startswith("damaged"), len(damaged)
    stale = {
        "revision 0": dict(revision=0, pool=pool, spatial=spatial),
        "float64": dict(revision=FEATURES_REVISION, pool=pool.astype(np.float64), spatial=spatial),
        "NaN": dict(revision=FEATURES_REVISION, pool=pool, spatial=np.full_like(spatial, np.nan)),
        "pool features": dict(revision=FEATURES_REVISION, pool=pool[:, :5], spatial=spatial),
        "damaged: KeyError": dict(pool=pool, spatial=spatial),
    }
    for reason, arrays in stale.items():
        np.savez(path, **arrays)
        loaded, why = _load_cached(path, 10, 6)
        assert loaded is None and reason in why, (reason, why)
    np.savez(path, revision=FEATURES_REVISION, pool=pool, spatial=spatial)
    assert "expected float32 (11, D)" in _load_cached(path, 11, 6)[1]


def test_a_damaged_cache_is_replaced_and_no_cache_skips_it(batches, inception_small, tmp_path):
    ref, sample = batches[:2]
    first = run(ref, sample, inception_small)
    (cache,) = (tmp_path / "cache" / "reference-features").glob("*.npz")
    good = cache.read_bytes()
    cache.write_bytes(good[: len(good) // 3])  # an interrupted copy, a full disk ...
    second = run(ref, sample, inception_small)
    assert second["reference"]["features_cached"] is False
    assert any("is unusable (damaged: BadZipFile" in n for n in second["notes"])
    assert [second[k] for k in METRICS] == [first[k] for k in METRICS]
    assert cache.read_bytes() == good  # written again, whole
    # A cache that loads but holds other features is used as is ...
    from selfflow.eval.evaluator import _load_cached, _save_cached

    acts, _ = _load_cached(cache, 120, 66)
    acts.pool[:] = acts.pool[::-1] * 1.5
    _save_cached(cache, acts)
    poisoned = cache.read_bytes()
    assert run(ref, sample, inception_small)["fid"] != first["fid"]
    # ... and --no-cache neither reads it nor writes it.
    code = main(
        ["evaluate", str(ref), str(sample), "--inception", str(inception_small)]
        + ["--device", "cpu", "--no-cache"]
    )
    assert code == 0 and cache.read_bytes() == poisoned
    assert run(ref, sample, inception_small, use_cache=False)["fid"] == first["fid"]


METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


def test_report_has_adms_five_lines_in_order():
    metrics = {
        "inception_score": 151.40123,
        "fid": 5.7,
        "sfid": 4.97,
        "precision": 0.72,
        "recall": 0.6712,
    }
    assert format_report(metrics).splitlines() == [
        "Inception Score: 151.40123",
        "FID: 5.7",
        "sFID: 4.97",
        "Precision: 0.72",
        "Recall: 0.6712",
    ]


# --- bad input: clear errors, nothing written --------------------------------------------------


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


BAD_SAMPLES = {
    "no_arr_0": (lambda: {"images": make_images(8, 16, 3)}, r"has no array 'arr_0'.*'images'"),
    "float_images": (
        lambda: {"arr_0": make_images(8, 16, 3).astype(np.float32)},
        r"float32 images; expected uint8",
    ),
    "nan_images": (
        lambda: {"arr_0": np.full((8, 16, 16, 3), np.nan, np.float32)},
        r"float32 images; expected uint8",
    ),
    "grey_images": (lambda: {"arr_0": make_images(8, 16, 3)[..., 0]}, r"shape \[8, 16, 16\]"),
    "nchw_images": (
        lambda: {"arr_0": make_images(8, 16, 3).transpose(0, 3, 1, 2).copy()},
        r"expected \(N, H, W, 3\)",
    ),
    "three_images": (lambda: {"arr_0": make_images(3, 16, 3)}, r"holds 3 images; at least 4"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_batches_are_refused(case, batches, inception_small, tmp_path):
    ref = batches[0]
    arrays, message = BAD_SAMPLES[case]
    sample = _save(tmp_path / "bad.npz", **arrays())
    out = tmp_path / "out"
    with pytest.raises(ConfigurationError, match=message):
        run(ref, sample, inception_small, out)
    assert not out.exists()


def test_bad_references_are_refused_and_nothing_is_written(batches, inception_small, tmp_path):
    ref, sample, ref_images, _ = batches
    out = tmp_path / "out"
    d, ds = 66, 63
    spatial = {"mu_s": np.zeros(ds), "sigma_s": np.eye(ds)}
    cases = {
        "stats only": ({"mu": np.zeros(d), "sigma": np.eye(d)}, r"no array 'arr_0'.*'mu'"),
        "NaN statistics": (
            {"arr_0": ref_images, "mu": np.full(d, np.nan), "sigma": np.eye(d), **spatial},
            "NaN",
        ),
        "wrong size": (
            {"arr_0": ref_images, "mu": np.zeros(2048), "sigma": np.eye(2048), **spatial},
            "do not fit this Inception graph's 66 features",
        ),
        # ADM takes all four statistics when 'mu' is there.
        "mu without the rest": (
            {"arr_0": ref_images, "mu": np.zeros(d), "sigma": np.eye(d), "mu_s": np.zeros(ds)},
            "has 'mu' but no 'sigma_s'",
        ),
    }
    for name, (arrays, message) in cases.items():
        bad = _save(tmp_path / f"{name.replace(' ', '_')}.npz", **arrays)
        with pytest.raises(ConfigurationError, match=message):
            run(bad, sample, inception_small, out)
        assert not out.exists(), name
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file" * 100)
    with pytest.raises(ConfigurationError, match="not a readable .npz"):
        run(garbage, sample, inception_small, out)
    with pytest.raises(ConfigurationError, match="does not exist"):
        run(tmp_path / "missing.npz", sample, inception_small, out)
    assert not out.exists()


def test_corrupt_graph_and_bad_out_dir_are_refused(batches, tmp_path):
    ref, sample = batches[:2]
    corrupt = tmp_path / "graph.pb"
    corrupt.write_bytes(b"\x0a\xff\xff\xff\xff garbage")
    out = tmp_path / "out"
    with pytest.raises(ConfigurationError, match="not a readable TensorFlow GraphDef"):
        run(ref, sample, corrupt, out)
    assert not out.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        run(ref, sample, corrupt, a_file)
    assert a_file.read_text() == "x"


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_images_are_streamed_not_loaded(tmp_path, compressed):
    images = rng.integers(0, 256, (1500, 32, 32, 3), dtype=np.uint8)  # 4.6 MB
    path = tmp_path / "big.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images)
    with zipfile.ZipFile(path) as archive:
        kind = archive.getinfo("arr_0.npy").compress_type
    assert kind == (zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    reader = NpzImages(path)
    tracemalloc.start()
    seen = []
    for batch in reader.batches(16):
        seen.append(batch[:, 0, 0, 0].copy())
        assert len(batch) <= 16
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(np.concatenate(seen), images[:, 0, 0, 0])  # file order
    # A few 49 kB batches plus zlib's buffers, never the 4.6 MB array.
    assert peak < 500_000 < images.nbytes / 9


def test_truncated_image_data_is_reported(tmp_path):
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    header = np.lib.format.header_data_from_array_1_0(images)
    header["shape"] = (12, 8, 8, 3)  # promises two images more than it holds
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(images.tobytes())
    reader = NpzImages(path)
    with pytest.raises(ConfigurationError, match="promises 12 images, the data holds 10"):
        list(reader.batches(4))


def test_damaged_image_data_is_reported(tmp_path):
    images = rng.integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "damaged.npz"
    np.savez(path, arr_0=images)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the stored image data
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigurationError, match="damaged.*CRC"):
        list(NpzImages(path).batches(4))  # found at the end of the member, after the header
    path.write_bytes(bytes(data[:200]) + bytes(data[-22:]))  # a small one fails on opening
    with pytest.raises(ConfigurationError, match="damaged|not a readable"):
        NpzImages(path)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ConfigurationError])
def test_a_failure_does_not_wait_for_the_sample_hash(
    failure, batches, inception_small, tmp_path, monkeypatch
):
    """The sample sha256 runs in the background; an error stops it within one chunk."""
    import time

    from selfflow.eval import evaluator as ev

    ref = batches[0]
    sample = _save(tmp_path / "sample.npz", arr_0=make_images(40, 128, 5))  # about 2 MB
    chunks = []

    import hashlib
    import threading

    class SlowDigest:  # in the background thread, 20 ms per 4 kB chunk: about 10 s in all
        def __init__(self):
            self.real = hashlib.sha256()

        def update(self, block):
            self.real.update(block)
            if threading.current_thread() is not threading.main_thread():
                chunks.append(len(block))
                time.sleep(0.02)

        def hexdigest(self):
            return self.real.hexdigest()

    import types

    from selfflow.base import files

    monkeypatch.setattr(files, "HASH_CHUNK", 4096)
    monkeypatch.setattr(files, "hashlib", types.SimpleNamespace(sha256=SlowDigest))

    def fail(*args, **kwargs):
        time.sleep(0.2)  # the hash is under way
        raise failure("stop here")

    monkeypatch.setattr(ev, "compute_activations", fail)
    started = time.perf_counter()
    with pytest.raises(failure, match="stop here"):
        run(ref, sample, inception_small, use_cache=False)
    assert time.perf_counter() - started < 3
    assert 0 < len(chunks) < sample.stat().st_size // 4096 // 3


def test_feature_extraction_sees_one_batch_at_a_time(tmp_path):
    images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)

    class Recorder:
        sizes: list[int] = []

        def features(self, batch: torch.Tensor):
            self.sizes.append(len(batch))
            first = batch[:, 0, 0, :].to(torch.float32)
            return first, first.repeat(1, 2)

    model = Recorder()
    acts = compute_activations(model, NpzImages(tmp_path / "s.npz"), batch_size=5, progress=False)
    assert model.sizes == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(acts.pool, images[:, 0, 0, :].astype(np.float32))


# --- command line -------------------------------------------------------------------------------


REPORT = re.compile(
    r"Inception Score: (\S+)\nFID: (\S+)\nsFID: (\S+)\nPrecision: (\S+)\nRecall: (\S+)\n?$"
)


def test_cli_prints_the_five_lines(batches, inception_small, tmp_path, capsys):
    ref, sample = batches[:2]
    out = tmp_path / "cli_out"
    code = main(
        [
            "evaluate",
            str(ref),
            str(sample),
            str(out),
            "--inception",
            str(inception_small),
            "--device",
            "cpu",
            "--batch-size",
            "16",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    for step in ("Inception Score", "FID", "sFID", "precision and recall"):
        assert f"computing {'the ' if step[0] == 'I' else ''}{step}" in captured.err
    assert re.search(r"precision/recall: 100%.*3/3", captured.err)  # one block per pass
    match = REPORT.search(printed)
    assert match, printed
    saved = json.loads((out / "metrics.json").read_text())
    assert float(match.group(2)) == saved["fid"] and float(match.group(5)) == saved["recall"]


def test_cli_reports_bad_input_in_one_line(batches, inception_small, tmp_path, capsys):
    bad = _save(tmp_path / "bad.npz", images=make_images(5, 8, 1))
    code = main(["evaluate", str(batches[0]), str(bad), "--inception", str(inception_small)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("selfflow evaluate: error:") and "arr_0" in err[-1]


def test_root_evaluator_script_takes_adms_arguments(batches, inception_small, tmp_path):
    ref, sample = batches[:2]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluator.py"),
            str(ref),
            str(sample),
            "--inception",
            str(inception_small),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "SELFFLOW_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    assert REPORT.search(proc.stdout), proc.stdout


def test_root_evaluator_script_names_itself(tmp_path):
    script = str(REPO / "evaluator.py")
    shown = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and shown.stdout.startswith("usage: evaluator.py ")
    assert "--no-cache" in shown.stdout and "selfflow evaluate" not in shown.stdout
    missing = str(tmp_path / "missing.npz")
    failed = subprocess.run(
        [sys.executable, script, missing, missing], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("evaluator.py: error: reference")


def test_the_evaluator_never_imports_tensorflow():
    code = (
        "import sys, selfflow.cli, selfflow.base.download, selfflow.eval.evaluator, "
        "selfflow.eval.synthetic; selfflow.cli.build_parser(); "
        "assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules), 'tensorflow'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_help_states_the_tolerance_and_claims_no_identity(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "features to about 1e-5" in text and "Inception Score to about 1e-4" in text
    assert re.search(r"[Pp]recision and recall .* differed by at most 0\.\d+", text)
    assert not re.search(r"exactly|identical", text, re.IGNORECASE)
    from selfflow.eval import metrics

    assert "differed by at most" in metrics.__doc__ and "as TF does" not in metrics.__doc__
