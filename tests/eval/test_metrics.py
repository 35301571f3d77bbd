"""Metrics against independent float64 references written differently from the code under test.

Tolerances (measured margins are far inside them):

- FID/sFID: relative 1e-9 against ``tr sqrt(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2))``
  computed with symmetric eigendecompositions (the code uses scipy's Schur-based sqrtm), and
  1e-6 when the means stay float32 as in ADM (``mu1 - mu2`` is then rounded to float32);
- statistics: the mean within float32 rounding (ADM keeps it in float32), the covariance to
  1e-12 against an explicit float64 centred product;
- IS: relative 1e-5 against a float64 loop (ADM computes in float32);
- precision/recall: exact equality with a float64 brute-force k-NN whenever the float16
  distances are exact (small-integer features), and at most one point's flip per hundred on
  random features, where float16 rounding may move a borderline point.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfflow.base.errors import EvaluationError, SelfFlowError
from selfflow.eval.metrics import (
    Statistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)
from tests.eval.references import (
    fid_by_eigendecomposition,
    float16_distances_numpy,
    inception_score_float64,
    knn_precision_recall,
)

rng = np.random.default_rng(20240601)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# --- statistics and FID ---------------------------------------------------------------------


def test_statistics_are_float32_mean_and_float64_covariance():
    acts = rng.normal(2.0, 3.0, (500, 12)).astype(np.float32)
    stats = compute_statistics(acts)
    x = acts.astype(np.float64)
    centred = x - x.mean(axis=0)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        stats.sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dim", [1, 16, 64])
def test_fid_matches_eigendecomposition_formula(dim):
    a = rng.normal(0.0, 1.0, (400, dim)).astype(np.float32)
    b = (rng.normal(0.3, 1.4, (300, dim)) @ rng.normal(0, 0.5, (dim, dim)) + 0.2).astype(np.float32)
    s1, s2 = compute_statistics(a), compute_statistics(b)
    expected = fid_by_eigendecomposition(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert expected > 0.1
    # ADM keeps the means in float32, so mu1 - mu2 is rounded to float32 ...
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-6)
    # ... with float64 means, the square-root term agrees to float64 accuracy.
    s1_64, s2_64 = (Statistics(s.mu.astype(np.float64), s.sigma) for s in (s1, s2))
    assert frechet_distance(s1_64, s2_64) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(s1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussians_in_closed_form():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    s1 = Statistics(np.array([0.0, 1.0, 2.0]), np.diag(var1))
    s2 = Statistics(np.array([1.0, 1.0, 0.0]), np.diag(var2))
    expected = 1 + 0 + 4 + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-12)


def test_fid_retries_with_offset_when_square_root_is_not_finite():
    # s1 s2 = [[0, 1e-4], [0, 0]] is nilpotent: it has no square root (scipy returns inf).
    s1 = Statistics(np.zeros(2), np.array([[1.0, 1e-4], [1e-4, 0.0]]))
    s2 = Statistics(np.array([0.5, 0.0]), np.array([[0.0, 0.0], [0.0, 1.0]]))
    notes: list[str] = []
    with pytest.warns(RuntimeWarning, match="offset|diagonal"):
        value = frechet_distance(s1, s2, notes=notes)
    assert notes and "1e-06" in notes[0]
    # Independent: the trace of the principal root of the 2x2 offset product is the sum of the
    # square roots of its (real, positive) eigenvalues.
    eps = np.eye(2) * 1e-6
    eig = np.linalg.eigvals((s1.sigma + eps) @ (s2.sigma + eps))
    assert np.all(np.abs(eig.imag) == 0) and np.all(eig.real > 0)
    expected = 0.25 + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * np.sqrt(eig.real).sum()
    assert value == pytest.approx(expected, rel=1e-9)


def test_fid_prints_nothing_whatever_the_scipy_release(monkeypatch, capsys):
    """stdout is ADM's five lines: SciPy <= 1.15 prints on failure unless disp=False."""
    from scipy import linalg

    real_sqrtm = linalg.sqrtm
    calls = []

    def sqrtm_1_15(a, disp=True, blocksize=64):  # SciPy 1.10-1.15 behaviour
        calls.append(disp)
        root = real_sqrtm(a)
        if disp:
            if not np.isfinite(root).all():
                print("Failed to find a square root.")
            return root
        return root, 0.0

    def sqrtm_1_18(a):  # disp removed
        calls.append(None)
        return real_sqrtm(a)

    s1 = Statistics(np.zeros(2), np.array([[1.0, 1e-4], [1e-4, 0.0]]))  # no finite root
    s2 = Statistics(np.array([0.5, 0.0]), np.array([[0.0, 0.0], [0.0, 1.0]]))
    values = []
    for fake in (sqrtm_1_15, sqrtm_1_18):
        monkeypatch.setattr(linalg, "sqrtm", fake)
        with pytest.warns(RuntimeWarning, match="diagonal"):
            values.append(frechet_distance(s1, s2))
    assert calls == [False, False, None, None]  # the failed root, then the retry with an offset
    assert capsys.readouterr().out == ""
    assert values[0] == values[1] and np.isfinite(values[0])


def test_fid_keeps_real_part_of_slightly_complex_root():
    s1 = Statistics(np.zeros(2), np.diag([1.0, -1e-8]))  # sqrt(-1e-8) = 1e-4 i < 1e-3
    s2 = Statistics(np.ones(2), np.eye(2))
    assert frechet_distance(s1, s2) == pytest.approx(2 + (1 - 1e-8) + 2 - 2 * 1.0, rel=1e-12)


def test_fid_refuses_a_clearly_complex_root():
    s1 = Statistics(np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(EvaluationError, match="imaginary component of 1"):
        frechet_distance(s1, Statistics(np.zeros(2), np.eye(2)))


def test_fid_refuses_statistics_of_different_sizes():
    with pytest.raises(EvaluationError, match="differ in size"):
        frechet_distance(Statistics(np.zeros(2), np.eye(2)), Statistics(np.zeros(3), np.eye(3)))


def test_metric_errors_are_user_errors_and_value_errors():
    # The CLI prints SelfFlowErrors as one line; callers that catch ValueError keep working.
    with pytest.raises(SelfFlowError) as caught:
        frechet_distance(Statistics(np.zeros(2), np.eye(2)), Statistics(np.zeros(3), np.eye(3)))
    assert isinstance(caught.value, ValueError)
    assert type(caught.value) is EvaluationError


# --- Inception Score ----------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_inception_score_matches_float64_with_file_order_splits():
    labels = rng.integers(0, 10, 11000)
    logits = rng.normal(0, 1, (11000, 10)) + 6 * np.eye(10)[labels]
    probs = _softmax(logits)
    expected = inception_score_float64(probs)  # splits 5000, 5000, 1000
    assert inception_score(probs) == pytest.approx(expected, rel=1e-5)
    # Order matters (ADM's known pitfall): class-sorted files give a different score.
    order = np.argsort(labels, kind="stable")
    sorted_score = inception_score(probs[order])
    assert sorted_score == pytest.approx(inception_score_float64(probs[order]), rel=1e-5)
    assert abs(sorted_score - expected) > 0.1


def test_inception_score_of_identical_predictions_is_one():
    probs = np.tile(_softmax(rng.normal(size=(1, 20))), (50, 1))
    assert inception_score(probs) == pytest.approx(1.0, abs=1e-6)


# --- precision and recall -------------------------------------------------------------------------


def test_float16_distance_block_matches_numpy_float16():
    u = rng.normal(0, 2, (50, 40)).astype(np.float32)
    v = rng.normal(0, 2, (30, 40)).astype(np.float32)
    ours = pairwise_distances(t(u), t(v)).numpy()
    np.testing.assert_array_equal(ours, float16_distances_numpy(u, v).astype(np.float32))
    # And it is float16-coarse, not float32: values sit on the float16 grid.
    assert np.array_equal(ours, ours.astype(np.float16).astype(np.float32))


def test_precision_recall_exact_on_small_integer_features():
    # Squared distances are small integers: exact in float16, with many ties (<= matters).
    ref = rng.integers(0, 3, (30, 6)).astype(np.float32)
    sample = rng.integers(0, 4, (25, 6)).astype(np.float32)
    expected = knn_precision_recall(ref, sample)
    assert 0 < expected[0] < 1 or 0 < expected[1] < 1
    assert precision_recall(t(ref), t(sample)) == expected
    assert precision_recall(t(ref), t(sample), block=7) == expected  # blocks change nothing


def test_precision_recall_shows_its_blocks_on_stderr(capsys):
    ref = rng.integers(0, 3, (30, 6)).astype(np.float32)
    sample = rng.integers(0, 4, (25, 6)).astype(np.float32)
    quiet = precision_recall(t(ref), t(sample), block=7)
    assert capsys.readouterr().err == ""
    assert precision_recall(t(ref), t(sample), block=7, progress=True) == quiet
    captured = capsys.readouterr()
    # 5 x 5 reference blocks, 4 x 4 sample blocks, 5 x 4 cross blocks.
    assert captured.out == "" and "precision/recall" in captured.err
    assert "61/61" in captured.err and "block" in captured.err


def test_precision_recall_on_random_features():
    ref = rng.normal(0, 1, (300, 32)).astype(np.float32)
    sample = rng.normal(0.25, 1.1, (200, 32)).astype(np.float32)
    p64, r64 = knn_precision_recall(ref, sample)
    p, r = precision_recall(t(ref), t(sample), block=64)
    assert 0.05 < p64 < 0.95 and 0.05 < r64 < 0.95
    assert abs(p - p64) <= 0.01 and abs(r - r64) <= 0.01


def test_radius_is_the_third_neighbour_with_self_included():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=np.float32)
    # Squared distances from 0: 0, 1, 9, 36, 100 -> the 4th smallest (self included) is 36.
    np.testing.assert_array_equal(manifold_radii(t(x)).numpy(), [36, 25, 9, 25, 81])
    np.testing.assert_array_equal(manifold_radii(t(x), block=2).numpy(), [36, 25, 9, 25, 81])
    with pytest.raises(EvaluationError, match="at least 4"):
        manifold_radii(t(x[:3]))


def test_precision_uses_float16_rounding_like_adm():
    # The sample (-30, 0.25) is 900.0625 from the reference point 0, whose radius is 900: outside
    # in exact arithmetic, inside once the distance is rounded to float16 (900.0625 -> 900).
    ref = np.array([[0, 0], [10, 0], [20, 0], [30, 0]], dtype=np.float32)
    sample = np.array([[-30, 0.25], [-100, 0], [-101, 0], [-102, 0]], dtype=np.float32)
    assert knn_precision_recall(ref, sample)[0] == 0.0
    precision, _ = precision_recall(t(ref), t(sample))
    assert precision == 0.25


def test_float32_fallback_when_float16_overflows():
    # Norms above 65504 overflow float16; ADM recomputes such blocks in float32.
    ref = rng.normal(0, 1, (60, 16)).astype(np.float32) * 300
    sample = rng.normal(0.3, 1, (50, 16)).astype(np.float32) * 300
    d = pairwise_distances(t(ref), t(sample)).numpy()
    assert np.isfinite(d).all() and d.max() > 65504  # would be inf in float16
    exact = ((ref[:, None].astype(np.float64) - sample[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4)
    assert precision_recall(t(ref), t(sample)) == pytest.approx(
        knn_precision_recall(ref, sample), abs=0.02
    )


def _fake_backends(new_api: bool) -> SimpleNamespace:
    if new_api:  # torch >= 2.9
        return SimpleNamespace(
            cuda=SimpleNamespace(matmul=SimpleNamespace(fp32_precision="tf32")),
            cudnn=SimpleNamespace(conv=SimpleNamespace(fp32_precision="tf32"), allow_tf32=True),
        )
    return SimpleNamespace(  # torch < 2.9: no fp32_precision anywhere
        cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True)),
        cudnn=SimpleNamespace(allow_tf32=True),
    )


@pytest.mark.parametrize("new_api", [True, False], ids=["fp32_precision", "allow_tf32"])
def test_full_fp32_turns_tf32_off_and_restores_the_caller_setting(new_api):
    from selfflow.base.precision import full_fp32

    backends = _fake_backends(new_api)
    if new_api:

        def state():
            return (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision)

        caller, full = ("tf32", "tf32"), ("ieee", "ieee")
    else:

        def state():
            return (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)

        caller, full = (True, True), (False, False)
    with full_fp32(backends):
        assert state() == full
        if new_api:
            assert backends.cudnn.allow_tf32 is True  # the old switch is left alone
    assert state() == caller
    with pytest.raises(KeyError), full_fp32(backends):  # restored on errors too
        assert state() == full
        raise KeyError("boom")
    assert state() == caller


def test_full_fp32_on_the_installed_torch():
    from selfflow.base.precision import full_fp32

    matmul = torch.backends.cuda.matmul
    name, tf32, ieee = (
        ("fp32_precision", "tf32", "ieee")
        if hasattr(matmul, "fp32_precision")
        else ("allow_tf32", True, False)
    )
    saved = getattr(matmul, name)
    setattr(matmul, name, tf32)
    try:
        with full_fp32():
            assert getattr(matmul, name) == ieee
        assert getattr(matmul, name) == tf32
    finally:
        setattr(matmul, name, saved)
