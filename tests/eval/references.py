"""Independent float64 (and numpy float16) references for the metrics, written plainly.

They share nothing with ``selfflow.eval.metrics``: eigendecompositions instead of a Schur
square root, explicit loops instead of vectorised float32 code, brute-force k-NN.
"""

from __future__ import annotations

import numpy as np


def fid_by_eigendecomposition(mu1, s1, mu2, s2) -> float:
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ s2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(
        diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    )


def inception_score_float64(p: np.ndarray, split: int = 5000) -> float:
    p = p.astype(np.float64)
    scores = []
    for start in range(0, len(p), split):
        part = p[start : start + split]
        marginal = part.sum(axis=0) / len(part)
        kl = [sum(row[c] * np.log(row[c] / marginal[c]) for c in range(len(row))) for row in part]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def squared_distances_float64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def knn_precision_recall(
    ref: np.ndarray, sample: np.ndarray, k: int = 3, distances=squared_distances_float64
) -> tuple[float, float]:
    """Brute force: radius = distance to the k-th neighbour (self excluded); ``<=`` is inside."""

    def radii(x):
        d = np.asarray(distances(x, x), dtype=np.float64)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    r_ref, r_sample = radii(ref), radii(sample)
    d = np.asarray(distances(ref, sample), dtype=np.float64)
    precision = np.mean([(d[:, j] <= r_ref).any() for j in range(len(sample))])
    recall = np.mean([(d[i, :] <= r_sample).any() for i in range(len(ref))])
    return float(precision), float(recall)


def float16_distances_numpy(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's float16 distance block written with numpy's float16 arithmetic."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = (u16 * u16).sum(axis=1, dtype=np.float32).astype(np.float16)
    nv = (v16 * v16).sum(axis=1, dtype=np.float32).astype(np.float16)
    products = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    return np.maximum(nu[:, None] - np.float16(2) * products + nv[None, :], np.float16(0))


def pool3_like_features(
    rng: np.random.Generator, n: int, shift: float = 0.0, dim: int = 2048
) -> np.ndarray:
    """Non-negative features with pool_3's width and scale (|N(shift, 1)| * 0.3, 2048 wide).

    Squared norms near 185 and distances from about 120 to 150: float16's spacing there is
    0.125, coarse enough that borderline points exist, as with real Inception features.
    """
    return (np.abs(rng.normal(shift, 1.0, (n, dim))) * 0.3).astype(np.float32)


def gram_distances(u: np.ndarray, v: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Squared distances in the Gram form ``|u|^2 - 2 u.v + |v|^2`` (clamped at 0) in ``dtype``:
    float64 for an exact reference at sizes where the difference form would not fit in memory,
    float32 for what a port that ignored ADM's float16 would compute."""
    a, b = u.astype(dtype), v.astype(dtype)
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)
