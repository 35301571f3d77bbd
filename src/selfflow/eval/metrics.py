"""FID, sFID, Inception Score and improved precision/recall, computed as ADM computes them.

Every choice below that changes a reported digit follows ADM's evaluator:

- statistics: ``mu = mean(acts)`` in the activations' float32, ``sigma = cov(acts)`` in float64
  with N - 1;
- Fréchet distance: ``|mu1 - mu2|^2 + tr s1 + tr s2 - 2 tr sqrtm(s1 s2)``; a non-finite square
  root is retried with 1e-6 added to both diagonals; a complex one fails when a diagonal
  imaginary part exceeds 1e-3 and is otherwise replaced by its real part;
- Inception Score: float32 softmax, splits of 5000 in file order, ``exp(mean KL(p || mean p))``
  per split, averaged;
- precision/recall (k = 3): squared distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` in float16,
  recomputed in float32 only for a 10 000 x 10 000 block that is not finite; a point's radius is
  its 4th smallest distance within its own set (itself included).

How close the numbers are. The Inception features agree with TensorFlow's to about 1e-5
(relative to their scale), and FID, sFID and IS follow them to about 1e-4 relative. Precision
and recall cannot be bit-identical: ADM's float16 ``reduce_sum`` of the squared norms
accumulates in the order of TensorFlow's kernel, and we do not follow it: inputs and products
are rounded to float16, the products accumulate in float32, the squared norms are summed in
float32 and then rounded to float16, and every elementwise step is rounded to float16. A
borderline point can therefore fall on the other side of a radius. Against ADM's expression run
in TensorFlow's float16 CPU kernels, precision and recall differed by at most 0.0042 on random
features at pool_3's scale (``benchmarks/pr_tensorflow.py``; a test holds 0.006), and by up to
0.0835 on ill-conditioned features whose norms dwarf their distances.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from selfflow.base.errors import EvaluationError

BLOCK = 10_000
NEIGHBOURS = 3
IS_SPLIT = 5000
FID_EPS = 1e-6


@dataclass(frozen=True)
class Statistics:
    """Mean and covariance of a feature set (``mu``, ``sigma`` in ADM's npz files)."""

    mu: np.ndarray
    sigma: np.ndarray


def compute_statistics(activations: np.ndarray) -> Statistics:
    """ADM's statistics: float32 mean of float32 features, float64 covariance (N - 1)."""
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise EvaluationError(f"need at least 2 feature rows, got shape {list(activations.shape)}")
    return Statistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def _takes_disp(function) -> bool:
    try:
        return "disp" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's sqrtm, silent on stdout (stdout carries only ADM's five lines).

    SciPy up to 1.15 prints "Failed to find a square root." unless ``disp=False`` (which ADM
    passes too); 1.16 and 1.17 deprecate ``disp`` and print nothing; later releases drop it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular input, deprecated disp: we check the result
        if _takes_disp(linalg.sqrtm):
            result = linalg.sqrtm(matrix, disp=False)
        else:
            result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def frechet_distance(
    sample: Statistics, reference: Statistics, eps: float = FID_EPS, notes: list[str] | None = None
) -> float:
    """Fréchet distance between two Gaussians, with ADM's two fallbacks."""
    mu1, mu2 = np.atleast_1d(sample.mu), np.atleast_1d(reference.mu)
    sigma1, sigma2 = np.atleast_2d(sample.sigma), np.atleast_2d(reference.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvaluationError(
            f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        message = (
            f"the product of covariances has no finite square root; retrying with {eps:g} "
            f"added to both diagonals (as ADM does)"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if notes is not None:
            notes.append(message)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = float(np.max(np.abs(covmean.imag)))
            raise EvaluationError(
                f"the matrix square root has an imaginary component of {largest:g} "
                f"(ADM stops above 1e-3 on the diagonal): are the covariances valid?"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probabilities: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """ADM's IS: file-order splits, ``exp(mean_i KL(p_i || mean p))`` each, averaged (float32)."""
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Precision and recall


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: the value a float16 op would store."""
    return x.to(torch.float16).to(torch.float32)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's squared distances between rows of u and v, float16 first, float32 if not finite.

    Each step's result is rounded to float16; sums (the norms, the products) accumulate in
    float32 before that rounding (see the module docstring for how this differs from TF).
    """
    u16, v16 = _fp16(u), _fp16(v)
    norm_u = _fp16(_fp16(u16 * u16).sum(dim=1))
    norm_v = _fp16(_fp16(v16 * v16).sum(dim=1))
    products = _fp16(u16 @ v16.T)
    d = _fp16(norm_u[:, None] - _fp16(2 * products))
    d = torch.clamp_min(_fp16(d + norm_v[None, :]), 0.0)
    if bool(torch.isfinite(d).all()):
        return d
    norm_u, norm_v = (u * u).sum(dim=1), (v * v).sum(dim=1)
    return torch.clamp_min(norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :], 0.0)


def manifold_radii(
    features: torch.Tensor, k: int = NEIGHBOURS, block: int = BLOCK, bar=None
) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in its own set (self = 0th).

    ``bar`` (a tqdm bar, optional) advances by one per distance block.
    """
    n = features.shape[0]
    if n < k + 1:
        raise EvaluationError(f"need at least {k + 1} points for k = {k}, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for start in range(0, n, block):
        rows = features[start : start + block]
        nearest = None  # the k + 1 smallest distances seen so far, per row
        for col in range(0, n, block):
            d = pairwise_distances(rows, features[col : col + block])
            pool = d if nearest is None else torch.cat([nearest, d], dim=1)
            keep = min(k + 1, pool.shape[1])
            nearest = torch.topk(pool, keep, dim=1, largest=False, sorted=True).values
            if bar is not None:
                bar.update(1)
        radii[start : start + block] = nearest[:, k]
    return radii


def precision_recall(
    reference: torch.Tensor,
    sample: torch.Tensor,
    k: int = NEIGHBOURS,
    block: int = BLOCK,
    progress: bool = False,
) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (the reverse).

    With ``progress``, a bar on stderr counts the distance blocks (both radii passes, then the
    cross distances): 1 + 25 + 5 = 31 blocks for ADM's 10 000 references and 50 000 samples.
    """
    from tqdm.auto import tqdm

    blocks_ref = -(-reference.shape[0] // block)
    blocks_sample = -(-sample.shape[0] // block)
    with tqdm(
        total=blocks_ref**2 + blocks_sample**2 + blocks_ref * blocks_sample,
        desc="precision/recall",
        unit="block",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        ref_radii = manifold_radii(reference, k, block, bar)
        sample_radii = manifold_radii(sample, k, block, bar)
        ref_inside = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
        sample_inside = torch.zeros(sample.shape[0], dtype=torch.bool, device=sample.device)
        for i in range(0, reference.shape[0], block):
            for j in range(0, sample.shape[0], block):
                d = pairwise_distances(reference[i : i + block], sample[j : j + block])
                ref_inside[i : i + block] |= (d <= sample_radii[None, j : j + block]).any(dim=1)
                sample_inside[j : j + block] |= (d <= ref_radii[i : i + block, None]).any(dim=0)
                bar.update(1)
    precision = float(sample_inside.to(torch.float64).mean())
    recall = float(ref_inside.to(torch.float64).mean())
    return precision, recall
