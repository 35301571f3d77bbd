"""Post-hoc EMA's maths: power-function averaging profiles and their least-squares mixing.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, section 3) replace the exponential moving average by a *power-function* EMA, whose
weight on the parameters of step ``s`` at step ``t`` is proportional to ``s^γ``: the profile

    p_{γ,t}(τ) = (γ + 1) · τ^γ / t^(γ+1)     for 0 < τ <= t  (0 after t),

which integrates to 1 and whose width relative to its length, the *relative standard
deviation* ``σ_rel = √(γ+1) / ((γ+2)·√(γ+3))``, is the one number a user chooses. It is kept
with the update ``ema ← β_t·ema + (1 − β_t)·θ_t``, ``β_t = (1 − 1/t)^(γ+1)`` after the
optimiser step ``t`` (counted from 1, so the first update takes ``θ_1`` whole). Unrolled,
the weight of ``θ_s`` at step ``t`` is ``(s^(γ+1) − (s−1)^(γ+1)) / t^(γ+1)``: exactly the
integral of ``p_{γ,t}`` over ``(s−1, s]``. So the discrete EMA *is* the continuous profile
applied to the piecewise-constant trajectory ``θ(τ) = θ_s`` for ``τ ∈ (s−1, s]``.

Post-hoc: training keeps a few such EMAs (σ_rel 0.05 and 0.10 in EDM2) and saves snapshots of
them every K steps. Any other profile ``p*`` at a snapshot step is then approximated by the
combination ``Σ x_i · p_i`` of the snapshots' profiles that is closest to it in L2 over time;
the same ``x_i`` applied to the snapshots' weights give the reconstructed EMA. The inner
products of power-function profiles have a closed form (:func:`profile_dot`), so the solve
costs nothing next to reading the snapshots. Since every discrete weight is a bin integral of
the profile (above), the weights' own error vector is no larger in ℓ2 than the profile's L2
error (Cauchy-Schwarz over unit bins): the residual reported bounds what the steps see.

Everything here is float64 numpy; nothing depends on torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selfflow.base.errors import ConfigurationError

#: σ_rel of the uniform average (γ = 0), the widest profile of the family with γ >= 0. Larger
#: values would need γ < 0 (weights that fall with the step), where the map from γ to σ_rel
#: is no longer one-to-one, so they are refused.
MAX_SIGMA_REL = 1.0 / (2.0 * math.sqrt(3.0))


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma``."""
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ > 0 whose profile has relative standard deviation ``sigma_rel``.

    ``σ² = (γ+1) / ((γ+2)²·(γ+3))`` is the cubic ``γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0``;
    on γ >= 0 its left side rises monotonically, so the root is found by bisection (to float64
    resolution, with no polynomial root-finder's complex arithmetic to trust).
    """
    check_sigma_rel(sigma_rel, "sigma_rel")
    inverse = sigma_rel**-2

    def cubic(g: float) -> float:
        return ((g + 7.0) * g + 16.0 - inverse) * g + 12.0 - inverse

    low, high = 0.0, 1.0
    while cubic(high) < 0.0:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if cubic(middle) < 0.0 else (low, middle)
    return 0.5 * (low + high)


def check_sigma_rel(value: object, name: str) -> float:
    """``value`` as a σ_rel in (0, 1/(2√3)), else one line saying so."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0.0 < value < MAX_SIGMA_REL):
        raise ConfigurationError(
            f"{name} must be a relative EMA length σ_rel in (0, {MAX_SIGMA_REL:.4f}) (the "
            f"power-function EMA's exponent γ = 0 at {MAX_SIGMA_REL:.4f}, the plain average; "
            f"EDM2 tracks 0.05 and 0.10); got {value!r}"
        )
    return float(value)


def beta(gamma: float, t: int) -> float:
    """The decay of the power-function EMA's update after optimiser step ``t`` (from 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def step_weights(gamma: float, t: int) -> np.ndarray:
    """The weight of each step ``s = 1..t``'s parameters in the EMA at step ``t``: the integral
    of the profile over ``(s−1, s]``, computed without overflow for any γ and ``t``."""
    s = np.arange(1, t + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):  # s = 1: log1p(-1) = -inf, expm1(-inf) = -1, exact
        part = -np.expm1((gamma + 1.0) * np.log1p(-1.0 / s))
    return np.exp((gamma + 1.0) * (np.log(s) - math.log(t))) * part


def profile_dot(
    gamma_a: np.ndarray | float,
    t_a: np.ndarray | float,
    gamma_b: np.ndarray | float,
    t_b: np.ndarray | float,
) -> np.ndarray:
    """``∫ p_{γa,ta}(τ)·p_{γb,tb}(τ) dτ`` (broadcasting), computed in the log domain:

    ``(γa+1)(γb+1)·m^(γa+γb+1) / ((γa+γb+1)·ta^(γa+1)·tb^(γb+1))`` with ``m = min(ta, tb)``.
    """
    ga, ta, gb, tb = (np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    m = np.minimum(ta, tb)
    log = (
        np.log(ga + 1.0)
        + np.log(gb + 1.0)
        - np.log(ga + gb + 1.0)
        + (ga + gb + 1.0) * np.log(m)
        - (ga + 1.0) * np.log(ta)
        - (gb + 1.0) * np.log(tb)
    )
    return np.exp(log)


@dataclass(frozen=True)
class Reconstruction:
    """The snapshot coefficients for one target profile and how well they match it.

    ``residual``: ``‖Σ x_i·p_i − p*‖ / ‖p*‖`` in L2 over time, 0 for a profile the snapshots
    hold; what it means for the weights: their error is at most this share of the target
    profile's size applied to the trajectory's changes (see the module docstring).
    """

    coefficients: np.ndarray
    residual: float


def solve(gammas: Sequence[float], steps: Sequence[int], gamma: float, step: int) -> Reconstruction:
    """Least-squares coefficients of the snapshots ``(gammas[i], steps[i])`` for the profile
    ``(gamma, step)``: the normal equations ``G·x = c`` with the Gram matrix of the snapshots'
    profiles, solved by ``lstsq`` (near-dependent snapshots, such as two EMAs saved at close
    steps, make ``G`` ill-conditioned; ``lstsq`` drops its null directions instead of blowing
    them up)."""
    g = np.asarray(gammas, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    if g.shape != t.shape or g.ndim != 1 or len(g) == 0:
        raise ValueError("expected as many snapshot exponents as snapshot steps, at least one")
    gram = profile_dot(g[:, None], t[:, None], g[None, :], t[None, :])
    target = profile_dot(g, t, gamma, step)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    norm = float(profile_dot(gamma, step, gamma, step))
    squared = norm - 2.0 * float(x @ target) + float(x @ gram @ x)
    return Reconstruction(x, math.sqrt(max(squared, 0.0) / norm))


def snapshot_steps(every: int, start: int, end: int) -> list[int]:
    """The steps in ``(start, end]`` at which a run writes snapshots: every multiple of
    ``every`` and the last step."""
    steps = set(range((start // every + 1) * every, end + 1, every))
    if end > start:
        steps.add(end)
    return sorted(steps)
