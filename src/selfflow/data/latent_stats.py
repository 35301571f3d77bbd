"""Per-channel statistics of a dataset's latents, for ``selfflow prepare --latent-norm channel``.

What is measured is what the trainer feeds the model before normalisation: the scaled latent
``x = (z − shift) · scale`` with ``z = mean + std · n`` drawn afresh every step from the stored
posterior. Over images, pixels and draws its per-channel mean is the mean of the scaled
posterior means, and its variance is the variance of those means plus the mean of the scaled
posterior variances (``std²``): the law of total variance. Both are computed from the stored
rows (after any float16 rounding, so exactly what training reads), in float64.

Each shard's moments are taken in two passes over its rows (mean, then the sum of squared
deviations) and written into the shard's record; the dataset's are combined from the records
in shard order with Chan et al.'s pairwise update. Shards are fixed by the plan, whichever
process encoded them, so any number of processes, workers or restarts give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from selfflow.model.latents import LatentConvention

NORMS = ("none", "channel")  # --latent-norm


def shard_moments(rows: np.ndarray, convention: LatentConvention) -> dict[str, Any]:
    """``{"n", "mean", "m2"}`` per channel of one shard's rows ``(count, 2, C, H, W)``: the
    number of values, their mean and their sum of squared deviations (posterior spread
    included), in float64 (JSON keeps float64 exactly)."""
    means = rows[:, 0].astype(np.float64)
    scaled = (means - convention.shift_factor) * convention.scaling_factor
    count = scaled.shape[0] * scaled.shape[2] * scaled.shape[3]
    centre = scaled.mean(axis=(0, 2, 3))
    spread = ((scaled - centre[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
    if rows.shape[1] > 1:
        stds = rows[:, 1].astype(np.float64) * convention.scaling_factor
        spread = spread + (stds**2).sum(axis=(0, 2, 3))
    return {"n": int(count), "mean": centre.tolist(), "m2": spread.tolist()}


def combine(moments: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` of the whole dataset from its shards' moments (in order):
    Chan et al.'s update ``M2 = M2_a + M2_b + δ² · n_a · n_b / n``; std is the population one."""
    total = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for part in moments:
        n_b = int(part["n"])
        if n_b == 0:
            continue
        mean_b = np.asarray(part["mean"], dtype=np.float64)
        m2_b = np.asarray(part["m2"], dtype=np.float64)
        if mean is None or m2 is None:
            total, mean, m2 = n_b, mean_b, m2_b
            continue
        n = total + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta**2 * (total * n_b / n)
        total = n
    if mean is None or m2 is None:
        raise ValueError("no latents to measure: the dataset holds no images")
    return mean.tolist(), np.sqrt(m2 / total).tolist()


def shard_extra(header: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """What a shard's record adds for ``--latent-norm channel``: its moments (else nothing)."""
    if header.get("latent_norm") != "channel":
        return {}
    return {"moments": shard_moments(rows, LatentConvention.from_dict(header["latent"]))}


def finished_header(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's header once every shard is in: with ``--latent-norm channel``, the
    convention gains the statistics combined from the shards' moments, in shard order."""
    if header.get("latent_norm") != "channel":
        return header
    mean, std = combine([record["moments"] for record in records])
    convention = LatentConvention.from_dict(header["latent"]).with_statistics(mean, std)
    return {**header, "latent": convention.to_dict()}
