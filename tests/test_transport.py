"""Tests of the samplers and guidance against analytic cases and a float64 re-computation.

Gaussian data x0 ~ N(mu, s^2) (independent per dimension) gives the exact velocity in closed
form. With x_tau = (1 - tau) x0 + tau eps, write a = 1 - tau, b = tau. Then x_tau is Gaussian
with mean a mu and variance V = a^2 s^2 + b^2, and (x0, eps, x_tau) are jointly Gaussian with
Cov(x0, x_tau) = a s^2 and Cov(eps, x_tau) = b, so

    E[x0  | x_tau = x] = mu + (a s^2 / V) (x - a mu)
    E[eps | x_tau = x] =      (b     / V) (x - a mu)
    velocity(x, tau)   = E[eps - x0 | x] = ((b - a s^2) / V) (x - a mu) - mu.

The probability-flow ODE dx/dtau = velocity keeps x_tau = a mu + sqrt(V(tau)) z for the same z
(differentiate: dx/dtau = -mu + V'/(2V) (x - a mu) with V' = 2 (b - a s^2)); V(1) = 1, so the
exact flow map from noise x1 to data is affine: x0 = mu + s x1.
"""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.base.finite import NonFiniteSamplesError
from selfflow.sampling.transport import (
    guided_velocity,
    sample,
    sample_ode,
    sample_sde,
    sde_time_grid,
)

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
STD = torch.tensor([0.2, 0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_velocity(mu: torch.Tensor, s: torch.Tensor):
    """Exact paper-convention velocity for data N(mu, s^2) per dimension (module docstring)."""

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        m, sd = mu.to(x), s.to(x)
        b = tau.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a = 1 - b
        var = a * a * sd * sd + b * b
        return (b - a * sd * sd) / var * (x - a * m) - m

    return velocity


# --------------------------------------------------------------------------------------------
# The SDE's exact output law for Gaussian data
# --------------------------------------------------------------------------------------------


def stop_law_continuous(mu: float, s: float) -> tuple[float, float]:
    """Law of the SDE output in the limit dt -> 0, where only the stop at t = 0.96 remains.

    The reverse SDE keeps the marginals, so at t = 0.96 (tau = 0.04) x ~ N(0.96 mu, V) with
    V = 0.96^2 s^2 + 0.04^2. The Mean step x + 0.04 ((1 + 0.96) v - x), v = -velocity, is affine:
    with c = (0.04 - 0.96 s^2) / V, velocity = c (x - 0.96 mu) - mu, so
    x_out = (0.96 - 0.0784 c) x + 0.0784 c 0.96 mu + 0.0784 mu.
    Mean: 0.9216 mu + 0.0784 mu = mu exactly. Std: |0.96 - 0.0784 c| sqrt(V), which is not s
    (for s = 0.2 it is 0.1876: the stop leaves a little noise and the Mean step shrinks it).
    """
    var = 0.96**2 * s * s + 0.04**2
    c = (0.04 - 0.96 * s * s) / var
    return mu, abs(0.96 - 0.0784 * c) * math.sqrt(var)


def stop_law_discrete(mu: float, s: float, n: int) -> tuple[float, float]:
    """Exact law of the n-point Euler–Maruyama scheme for Gaussian data.

    Every step is x <- A x + B + sigma xi with scalars A, B, sigma, so the mean and variance of a
    standard-normal start propagate exactly: m <- A m + B, P <- A^2 P + sigma^2.
    """
    m, p = 0.0, 1.0
    for i in range(n):
        t = 0.96 * i / (n - 1) if i < n - 1 else 0.96
        h = 0.96 / (n - 1) if i < n - 1 else 0.04
        tau = 1 - t
        a, b = 1 - tau, tau
        var = a * a * s * s + b * b
        c = (b - a * s * s) / var
        # x + h ((1 + t)(-(c (x - a mu) - mu)) - x)
        gain = 1 + h * (-(1 + t) * c - 1)
        shift = h * (1 + t) * (c * a * mu + mu)
        noise_var = 2 * (1 - t) * h if i < n - 1 else 0.0
        m, p = gain * m + shift, gain * gain * p + noise_var
    return m, math.sqrt(p)


def test_sde_target_law_is_consistent():
    # The discrete scheme converges to the continuous stop law; its bias at 250 steps (< 0.5 %
    # of the std) is below the 4-standard-error tolerance used with 20 000 samples (2 %).
    for mu, s in zip(MU.tolist(), STD.tolist(), strict=True):
        m_c, s_c = stop_law_continuous(mu, s)
        m_d, s_d = stop_law_discrete(mu, s, 250)
        assert abs(m_d - m_c) < 1e-12
        assert abs(s_d - s_c) / s_c < 5e-3
        m_fine, s_fine = stop_law_discrete(mu, s, 4000)
        assert abs(s_fine - s_c) / s_c < 3e-4
    # The stop matters: for s = 0.2 the output std is 6 % below s, far outside the tolerance.
    assert abs(stop_law_continuous(1.0, 0.2)[1] - 0.2) / 0.2 > 0.05


def test_sde_recovers_gaussian_data():
    n = 20_000
    generator = torch.Generator().manual_seed(1234)
    x1 = torch.randn(n, 4, generator=generator)
    out = sample_sde(gaussian_velocity(MU, STD), x1, num_steps=250, generator=generator)
    assert out.dtype == torch.float32 and out.shape == (n, 4)
    out = out.double()
    for d in range(4):
        mu, s = MU[d].item(), STD[d].item()
        m_target, s_target = stop_law_continuous(mu, s)
        m_exact, s_exact = stop_law_discrete(mu, s, 250)
        mean, std = out[:, d].mean().item(), out[:, d].std().item()
        se_mean, se_std = s_target / math.sqrt(n), s_target / math.sqrt(2 * n)
        # Against the exact law of the scheme: Monte Carlo error only (4 standard errors).
        assert abs(mean - m_exact) < 4 * se_mean, (d, mean, m_exact)
        assert abs(std - s_exact) < 4 * se_std, (d, std, s_exact)
        # Against the continuous target: plus the discretisation bias bounded above (0.5 %).
        assert abs(mean - m_target) < 4 * se_mean
        assert abs(std - s_target) < 4 * se_std + 5e-3 * s_target
        assert abs(mean - mu) < 4 * se_mean  # the mean is exactly mu
    # s = 0.2 lands on the stop law, measurably not on s itself.
    assert abs(out[:, 0].std().item() - 0.2) > 8 * 0.2 / math.sqrt(2 * n)


def test_ode_heun_recovers_gaussian_data():
    n = 20_000
    generator = torch.Generator().manual_seed(99)
    x1 = torch.randn(n, 4, generator=generator)
    out = sample_ode(gaussian_velocity(MU, STD), x1, num_steps=50, solver="heun").double()
    # The Heun map is affine too: mu + s (1 + delta) x1, with |delta| <= 1.2e-3 at 50 steps
    # (measured in float64; Euler's delta at 50 steps is 2.5 to 5 %). So the output std is biased
    # by at most 2e-3 s, added to 4 standard errors of the Monte Carlo estimate.
    for d in range(4):
        mu, s = MU[d].item(), STD[d].item()
        mean, std = out[:, d].mean().item(), out[:, d].std().item()
        assert abs(mean - mu) < 4 * s / math.sqrt(n) + 2e-3 * s
        assert abs(std - s) < 4 * s / math.sqrt(2 * n) + 2e-3 * s
    exact = MU + STD * x1.double()
    assert ((out - exact).abs() / (STD * (x1.double().abs() + 0.01))).max().item() < 2e-3


def test_sample_dispatch_ode_matches_sample_ode_and_mode_is_case_insensitive():
    x1 = torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
    velocity = gaussian_velocity(MU, STD)
    direct = sample_ode(velocity, x1, num_steps=20, solver="euler")
    via = sample(velocity, x1, mode="ODE", num_steps=20, solver="Euler")
    assert torch.equal(direct, via)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample(velocity, x1, mode="SDE", num_steps=10, generator=g1)
    b = sample(velocity, x1, mode="sde", num_steps=10, generator=g2)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Convergence orders on the deterministic ODE
# --------------------------------------------------------------------------------------------


def _loglog_slope(steps: list[int], errors: list[float]) -> float:
    xs = [math.log(n) for n in steps]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return num / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize(("solver", "order"), [("euler", 1.0), ("heun", 2.0)])
def test_ode_convergence_order(solver: str, order: float):
    velocity = gaussian_velocity(MU, STD)
    x1 = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None].repeat(1, 4)
    exact = MU + STD * x1
    steps = [8, 16, 32, 64, 128]
    errors = [
        (sample_ode(velocity, x1, num_steps=n, solver=solver) - exact).abs().max().item()
        for n in steps
    ]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    slope = -_loglog_slope(steps, errors)
    assert abs(slope - order) < 0.15, (solver, slope, errors)


# --------------------------------------------------------------------------------------------
# Step-for-step agreement with a scalar float64 re-implementation of the official sampler
# --------------------------------------------------------------------------------------------


def _nonlinear_scalar_velocity(x: float, tau: float, j: int) -> float:
    return math.tanh(x) * (1 + tau) + 0.3 * tau * x * x - 0.1 * (j + 1)


def _nonlinear_velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    b = tau.to(x.dtype)[:, None]
    j = torch.arange(x.shape[1], dtype=x.dtype)
    return torch.tanh(x) * (1 + b) + 0.3 * b * x * x - 0.1 * (j + 1)


def _reference_sde(x0: list[list[float]], xis: list[list[list[float]]], n: int):
    """The official sampler literally: a scalar loop in the network's time t, float64 Python floats."""
    dt = 0.96 / (n - 1)
    x = [row[:] for row in x0]
    for i in range(n - 1):
        t = 0.96 * i / (n - 1)
        for r, row in enumerate(x):
            for j, value in enumerate(row):
                v = -_nonlinear_scalar_velocity(value, 1 - t, j)  # SiT velocity
                w = 1 - t
                score = (t * v - value) / (1 - t)
                drift = v + w * score
                row[j] = value + drift * dt + math.sqrt(2 * w) * math.sqrt(dt) * xis[i][r][j]
    for row in x:
        for j, value in enumerate(row):
            v = -_nonlinear_scalar_velocity(value, 1 - 0.96, j)
            row[j] = value + ((1 + 0.96) * v - value) * 0.04
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sde_matches_scalar_reference(dtype: torch.dtype):
    n = 30
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    xis = torch.randn(n - 1, 3, 2, generator=generator, dtype=torch.float64)
    expected = torch.tensor(_reference_sde(x0.tolist(), xis.tolist(), n), dtype=torch.float64)
    out = sample_sde(
        _nonlinear_velocity, x0.to(dtype), num_steps=n, brownian=lambda k: xis[k].to(dtype)
    )
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (out.double() - expected).abs().max().item() < tol


def test_sde_time_grid_is_linspace_to_0_96():
    grid = sde_time_grid(250)
    assert grid.dtype == torch.float64 and grid.shape == (250,)
    assert grid[0].item() == 0.0 and grid[-1].item() == 0.96
    expected = torch.linspace(0, 0.96, 250, dtype=torch.float64)
    assert (grid - expected).abs().max().item() < 1e-15
    assert torch.equal(sde_time_grid(3, last_t=0.5), torch.tensor([0.0, 0.25, 0.5]).double())


class RecordingVelocity:
    def __init__(self, inner=None):
        self.inner = inner
        self.taus: list[torch.Tensor] = []
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        self.taus.append(tau.clone())
        self.batch_sizes.append(x.shape[0])
        return torch.zeros_like(x) if self.inner is None else self.inner(x, tau)


@pytest.mark.parametrize("n", [49, 250])
def test_sde_passes_tau_one_minus_t_and_uses_n_evaluations(n: int):
    rec = RecordingVelocity()
    sample_sde(rec, torch.zeros(2, 3), num_steps=n, generator=torch.Generator().manual_seed(0))
    assert len(rec.taus) == n
    for i, tau in enumerate(rec.taus):
        t = Decimal("0.96") * i / (n - 1) if i < n - 1 else Decimal("0.96")
        expected = torch.tensor(float(Decimal(1) - t), dtype=torch.float32)
        assert tau.dtype == torch.float32 and tau.shape == (2,)
        assert torch.equal(tau, expected.expand(2)), (i, tau, expected)


def test_ode_time_grid_and_nfe():
    for solver, per_interval in (("euler", 1), ("heun", 2)):
        rec = RecordingVelocity()
        sample_ode(rec, torch.zeros(2, 3, dtype=torch.float64), num_steps=10, solver=solver)
        assert len(rec.taus) == 10 * per_interval
        taus = [tau[0].item() for tau in rec.taus]
        assert all(tau.dtype == torch.float64 for tau in rec.taus)
        if solver == "euler":
            assert taus == [(10 - k) / 10 for k in range(10)]
        else:
            assert taus[0::2] == [(10 - k) / 10 for k in range(10)]
            assert taus[1::2] == [(9 - k) / 10 for k in range(10)]


# --------------------------------------------------------------------------------------------
# Brownian source
# --------------------------------------------------------------------------------------------


def test_brownian_increments_are_exactly_the_source():
    n = 12
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    table = torch.randn(n - 1, 4, 3, generator=torch.Generator().manual_seed(2))
    asked: list[int] = []

    def brownian(k: int) -> torch.Tensor:
        asked.append(k)
        return table[k]

    cpu_state = torch.get_rng_state()
    untouched = torch.Generator().manual_seed(5)
    gen_state = untouched.get_state()
    out = sample_sde(
        lambda x, tau: torch.zeros_like(x), x, num_steps=n, brownian=brownian, generator=untouched
    )
    assert asked == list(range(n - 1))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(untouched.get_state(), gen_state)
    # Velocity 0: x <- x (1 - dt) + sqrt(2 (1 - t_i) dt) xi_i, then x <- x (1 - 0.04).
    dt = 0.96 / (n - 1)
    ref = x.double()
    for i in range(n - 1):
        t = 0.96 * i / (n - 1)
        ref = ref - ref * dt + math.sqrt(2 * (1 - t) * dt) * table[i].double()
    ref = ref * 0.96
    assert (out.double() - ref).abs().max().item() < 1e-5
    # A different source gives a different result (the increments really are used).
    other = sample_sde(
        lambda x, tau: torch.zeros_like(x), x, num_steps=n, brownian=lambda k: -table[k]
    )
    assert (other - out).abs().max().item() > 0.1


def test_generator_makes_sde_reproducible_and_x_is_not_modified():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    velocity = gaussian_velocity(MU, STD)
    a = sample_sde(velocity, x, num_steps=20, generator=torch.Generator().manual_seed(11))
    b = sample_sde(velocity, x, num_steps=20, generator=torch.Generator().manual_seed(11))
    c = sample_sde(velocity, x, num_steps=20, generator=torch.Generator().manual_seed(12))
    sample_ode(velocity, x, num_steps=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("bad_step", "value", "message"),
    [
        (0, torch.zeros(4, 4), r"brownian\(0\).*\(4, 3\).*\(4, 4\)"),
        (3, torch.zeros(3), r"brownian\(3\).*found shape \(3,\)"),
        (2, [0.0] * 12, r"brownian\(2\).*found list"),
    ],
)
def test_brownian_wrong_shape_is_refused(bad_step, value, message):
    def brownian(k: int):
        return value if k == bad_step else torch.zeros(4, 3)

    with pytest.raises(ConfigurationError, match=message):
        sample_sde(
            lambda x, tau: torch.zeros_like(x), torch.zeros(4, 3), num_steps=10, brownian=brownian
        )


# --------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------


NULL = 1000  # the released model's unconditional label, named by the caller (the pipeline)


class FakeModel:
    """Records every call; returns a value that depends on x, tau and the label."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], tau.clone(), y.clone()))
        return x * (y.to(x.dtype)[:, None] + 1) + tau.to(x.dtype)[:, None]


def _expected_guided(x, tau, labels, scale, null=NULL):
    cond = x * (labels.to(x.dtype)[:, None] + 1) + tau[:, None]
    uncond = x * (null + 1) + tau[:, None]
    return uncond + scale * (cond - uncond)


def test_guidance_inside_is_one_batched_call_with_the_formula():
    model = FakeModel()
    labels = torch.tensor([3, 207, 0])
    velocity = guided_velocity(
        model, labels, null_label=NULL, cfg_scale=1.5, guidance_interval=(0.0, 0.7)
    )
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    tau = torch.full((3,), 0.5)
    out = velocity(x, tau)
    assert len(model.calls) == 1
    size, tau_seen, y_seen = model.calls[0]
    assert size == 6
    assert torch.equal(y_seen, torch.tensor([3, 207, 0, 1000, 1000, 1000]))
    assert torch.equal(tau_seen, torch.full((6,), 0.5))
    assert torch.allclose(out, _expected_guided(x, tau, labels, 1.5), rtol=1e-6, atol=1e-5)


def test_the_null_label_is_the_callers_not_a_default_of_the_sampler():
    """A sampler knows a velocity function, not the network's label table: a 10-class model's
    null row is 10, and nothing in the sampler may assume the released model's 1000."""
    with pytest.raises(TypeError, match="null_label"):
        guided_velocity(FakeModel(), torch.tensor([1]), cfg_scale=2.0)  # type: ignore[call-arg]
    model = FakeModel()
    labels = torch.tensor([3, 7])
    velocity = guided_velocity(model, labels, null_label=10, cfg_scale=2.0)
    x, tau = torch.ones(2, 2), torch.full((2,), 0.5)
    out = velocity(x, tau)
    assert torch.equal(model.calls[0][2], torch.tensor([3, 7, 10, 10]))
    assert torch.allclose(out, _expected_guided(x, tau, labels, 2.0, null=10))


def test_guidance_interval_is_inclusive_and_outside_runs_only_the_conditional_pass():
    labels = torch.tensor([1, 2])
    x = torch.ones(2, 2)
    high = torch.tensor(0.7, dtype=torch.float32)
    just_above = torch.nextafter(high, torch.tensor(1.0))
    # (tau, guided?): the bound itself is inside, the next float32 above it is not.
    cases = [(0.0, True), (high.item(), True), (just_above.item(), False), (1.0, False)]
    for tau_value, guided in cases:
        model = FakeModel()
        velocity = guided_velocity(
            model, labels, null_label=NULL, cfg_scale=4.0, guidance_interval=(0.0, 0.7)
        )
        tau = torch.full((2,), tau_value, dtype=torch.float32)
        out = velocity(x, tau)
        assert [c[0] for c in model.calls] == ([4] if guided else [2]), tau_value
        if not guided:
            assert torch.equal(model.calls[0][2], labels)
            assert torch.equal(out, x * (labels[:, None] + 1) + tau[:, None])
    # Lower bound inclusive too, float64 tau compared in float64.
    model = FakeModel()
    velocity = guided_velocity(
        model, labels, null_label=NULL, cfg_scale=2.0, guidance_interval=(0.3, 0.3)
    )
    velocity(x.double(), torch.full((2,), 0.3, dtype=torch.float64))
    velocity(x.double(), torch.full((2,), math.nextafter(0.3, 0.0), dtype=torch.float64))
    assert [c[0] for c in model.calls] == [4, 2]


def test_cfg_one_never_runs_the_null_pass():
    model = FakeModel()
    labels = torch.tensor([5, 6, 7])
    velocity = guided_velocity(
        model, labels, null_label=NULL, cfg_scale=1.0, guidance_interval=(0.0, 1.0)
    )
    for tau in (0.0, 0.5, 1.0):
        velocity(torch.ones(3, 2), torch.full((3,), tau))
    assert [c[0] for c in model.calls] == [3, 3, 3]
    assert all(torch.equal(c[2], labels) for c in model.calls)


def test_guidance_with_mixed_times_guides_only_the_samples_inside():
    model = FakeModel()
    labels = torch.tensor([1, 2])
    velocity = guided_velocity(
        model, labels, null_label=NULL, cfg_scale=3.0, guidance_interval=(0.0, 0.7)
    )
    x = torch.ones(2, 2)
    tau = torch.tensor([0.5, 0.9])
    out = velocity(x, tau)
    assert torch.allclose(out[0], _expected_guided(x, tau, labels, 3.0)[0])
    assert torch.allclose(out[1], x[1] * 3 + 0.9)


def test_guided_sde_guides_exactly_the_steps_inside_the_interval():
    # N = 49: t_i = 0.02 i, so tau = 0.7 at i = 15 and tau = 0.3 at i = 35 exactly.
    n, labels = 49, torch.tensor([4, 9])
    for interval, guided_steps in (
        ((0.0, 0.7), set(range(15, 49))),
        ((0.3, 0.7), set(range(15, 36))),
    ):
        model = FakeModel()
        velocity = guided_velocity(
            lambda x, tau, y, m=model: m(x, tau, y) * 0.0,
            labels,
            null_label=NULL,
            cfg_scale=2.0,
            guidance_interval=interval,
        )
        sample_sde(velocity, torch.zeros(2, 2), num_steps=n, brownian=lambda k: torch.zeros(2, 2))
        sizes = [c[0] for c in model.calls]
        assert len(sizes) == n
        assert {i for i, size in enumerate(sizes) if size == 4} == guided_steps
        assert all(size in (2, 4) for size in sizes)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def _zero(x, tau):
    return torch.zeros_like(x)


@pytest.mark.parametrize("num_steps", [1, 0, -3, 2.5, True, "10"])
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_bad_num_steps(num_steps, mode):
    with pytest.raises(ConfigurationError, match="num_steps"):
        sample(_zero, torch.zeros(2, 2), mode=mode, num_steps=num_steps)


def test_two_steps_is_the_minimum_that_works():
    assert sample(_zero, torch.zeros(2, 2), mode="sde", num_steps=2).shape == (2, 2)
    assert sample(_zero, torch.zeros(2, 2), mode="ode", num_steps=2).shape == (2, 2)


@pytest.mark.parametrize("mode", ["dde", "", None, "ode2"])
def test_unknown_mode(mode):
    with pytest.raises(ConfigurationError, match="mode must be"):
        sample(_zero, torch.zeros(2, 2), mode=mode)


@pytest.mark.parametrize("solver", ["rk4", "", None])
def test_unknown_solver(solver):
    with pytest.raises(ConfigurationError, match="solver must be"):
        sample(_zero, torch.zeros(2, 2), mode="ode", solver=solver)
    with pytest.raises(ConfigurationError, match="solver must be"):
        sample_ode(_zero, torch.zeros(2, 2), solver=solver)


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_non_finite_velocity_names_the_step(mode):
    def velocity(x, tau):
        out = torch.zeros_like(x)
        if tau[0].item() <= 0.5:
            out[1] = float("nan")  # row 1 of 3 only
        return out

    # SDE N = 11: t_i = 0.096 i, tau <= 0.5 first at i = 6. ODE 10 intervals: tau_k = 1 - k/10,
    # Euler's first evaluation at tau <= 0.5 is interval 5.
    expected = r"SDE step 6 of 11" if mode == "sde" else r"ODE interval 5 of 10"
    with pytest.raises(NonFiniteSamplesError, match=expected) as caught:
        sample(
            velocity,
            torch.zeros(3, 2),
            mode=mode,
            num_steps=11 if mode == "sde" else 10,
            solver="euler",
        )
    assert caught.value.indices == [1] and "batch rows [1]" in str(caught.value)


def test_non_finite_brownian_and_start_are_refused():
    def brownian(k):
        xi = torch.zeros(2, 2)
        xi[0, 1] = math.inf if k == 2 else 0.0
        return xi

    with pytest.raises(NonFiniteSamplesError, match="SDE step 2 of 5") as caught:
        sample_sde(_zero, torch.zeros(2, 2), num_steps=5, brownian=brownian)
    assert caught.value.indices == [0]
    with pytest.raises(ConfigurationError, match="start noise"):
        sample_sde(_zero, torch.tensor([[0.0, math.nan]]), num_steps=5)


def test_bad_start_and_velocity_output():
    with pytest.raises(ConfigurationError, match="floating-point"):
        sample(_zero, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ConfigurationError, match="torch.Tensor"):
        sample(_zero, [[0.0]])
    with pytest.raises(ConfigurationError, match="batch dimension"):
        sample(_zero, torch.zeros(0, 3))
    with pytest.raises(ConfigurationError, match=r"shaped like x \(2, 2\).*\(2, 3\)"):
        sample(lambda x, tau: torch.zeros(2, 3), torch.zeros(2, 2), mode="ode")


@pytest.mark.parametrize("last_t", [0.0, 1.0, 1.5, math.nan])
def test_bad_last_t(last_t):
    with pytest.raises(ConfigurationError, match="last_t"):
        sde_time_grid(10, last_t=last_t)


@pytest.mark.parametrize("cfg_scale", [-0.1, math.nan, math.inf, "2", None])
def test_bad_cfg_scale(cfg_scale):
    with pytest.raises(ConfigurationError, match="cfg_scale"):
        guided_velocity(FakeModel(), torch.tensor([1]), null_label=NULL, cfg_scale=cfg_scale)


@pytest.mark.parametrize(
    "interval", [(0.8, 0.7), (-0.1, 0.5), (0.2, 1.1), (0.1,), (0.1, 0.2, 0.3), "ab", None, (0, "1")]
)
def test_bad_guidance_interval(interval):
    with pytest.raises(ConfigurationError, match="guidance_interval"):
        guided_velocity(
            FakeModel(),
            torch.tensor([1]),
            null_label=NULL,
            cfg_scale=2.0,
            guidance_interval=interval,
        )


def test_bad_labels_and_null_label():
    with pytest.raises(ConfigurationError, match="1-D integer"):
        guided_velocity(FakeModel(), torch.tensor([[1]]), null_label=NULL)
    with pytest.raises(ConfigurationError, match="integer tensor"):
        guided_velocity(FakeModel(), torch.tensor([1.0]), null_label=NULL)
    with pytest.raises(ConfigurationError, match="null_label"):
        guided_velocity(FakeModel(), torch.tensor([1]), null_label=-1)
    velocity = guided_velocity(FakeModel(), torch.tensor([1, 2]), null_label=NULL, cfg_scale=2.0)
    with pytest.raises(ConfigurationError, match="2 labels"):
        velocity(torch.zeros(3, 2), torch.zeros(3))


def test_progress_bar_and_callback():
    seen: list[tuple[int, int]] = []
    sample(
        _zero, torch.zeros(2, 2), mode="sde", num_steps=6, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(k, 6) for k in range(1, 7)]
    seen.clear()
    sample(
        _zero, torch.zeros(2, 2), mode="ode", num_steps=4, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(k, 4) for k in range(1, 5)]
    out = sample(_zero, torch.zeros(2, 2), mode="ode", num_steps=3, progress=True)
    assert out.shape == (2, 2)
