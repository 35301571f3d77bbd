"""Samplers for the linear flow path, as plain functions of a velocity function.

Conventions (the paper's): ``x_tau = (1 - tau) * x_data + tau * eps`` with ``tau = 1``
pure noise and ``tau = 0`` data, and ``velocity(x, tau) = E[eps - x_data | x_tau = x]`` where
``tau`` has shape ``(B,)``. The network's own (SiT) convention is ``t = 1 - tau`` and
``v = -velocity``; the SDE below is written in that ``t`` because that is how the official
sampler is stated.

* :func:`sample_sde` is the official Euler–Maruyama sampler, step for step: ``N`` network
  evaluations for ``num_steps = N``.
* :func:`sample_ode` integrates the probability-flow ODE, which for this path is
  ``dx/dtau = velocity(x, tau)`` itself, with Euler (``num_steps`` evaluations) or Heun
  (``2 * num_steps`` evaluations).
* :func:`guided_velocity` wraps a class-conditional model into a velocity function with
  classifier-free guidance restricted to a ``tau`` interval.

Every update is computed out of place in the dtype of ``x`` (pass float32 latents even when the
model runs in bf16). Step coefficients are Python floats computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from tqdm import tqdm

from selfflow.base.errors import ConfigurationError
from selfflow.base.finite import FirstNonFinite
from selfflow.sampling.defaults import DEFAULT_NUM_STEPS, default_num_steps
from selfflow.sampling.settings import (
    DEFAULT_CFG_SCALE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_MODE,
    DEFAULT_SOLVER,
    MODES,
    SOLVERS,
)

__all__ = [
    "BrownianSource",
    "Velocity",
    "guided_velocity",
    "sample",
    "sample_ode",
    "sample_sde",
    "sde_time_grid",
]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x, tau) -> eps - x_data``, ``tau`` of shape ``(B,)``."""

BrownianSource = Callable[[int], torch.Tensor]
"""``brownian(k) -> xi_k``: the standard-normal increment of SDE step ``k``, shaped like ``x``."""

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x, tau, y) -> eps - x_data`` for integer labels ``y`` of shape ``(B,)``."""

Progress = bool | Callable[[int, int], None]

_MODES = MODES
_SOLVERS = SOLVERS
OFFICIAL_LAST_T = 0.96  # the SDE stops at t = 1 - 0.04 and takes one noise-free "Mean" step


# --------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------


def _check_num_steps(num_steps: object, minimum: int = 2) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ConfigurationError(
            f"num_steps must be an integer >= {minimum}, found {num_steps!r} "
            f"({type(num_steps).__name__})"
        )
    if num_steps < minimum:
        raise ConfigurationError(f"num_steps must be >= {minimum}, found {num_steps}")
    return num_steps


def _decimal(value: float, name: str) -> Fraction:
    """The decimal number a user means by ``value`` (0.96 -> 24/25), as an exact fraction."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, found {value!r}")
    return Fraction(repr(float(value)))


def _sde_schedule(num_steps: int, last_t: float) -> tuple[list[Fraction], Fraction]:
    """Exact grid ``t_i = last_t * i / (N - 1)`` and its spacing, as fractions."""
    _check_num_steps(num_steps)
    end = _decimal(last_t, "last_t")
    if not 0 < end < 1:
        raise ConfigurationError(f"last_t must lie in (0, 1), found {last_t!r}")
    dt = end / (num_steps - 1)
    return [dt * i for i in range(num_steps)], dt


def sde_time_grid(num_steps: int, last_t: float = OFFICIAL_LAST_T) -> torch.Tensor:
    """The official SDE grid ``t_i = linspace(0, last_t, N)`` in network time (0 = noise).

    float64, each value the correctly rounded ``last_t * i / (N - 1)`` of the decimal ``last_t``.
    The official code builds this grid in float32 (``torch.linspace``); the two agree to one
    float32 ulp, which changes the drift by far less than float32 rounding of the update itself.
    """
    grid, _ = _sde_schedule(num_steps, last_t)
    return torch.tensor([float(t) for t in grid], dtype=torch.float64)


def _tau_dtype(x: torch.Tensor) -> torch.dtype:
    # The model's time embedding needs more than bf16/fp16 resolution (grid spacing 0.0039).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Shared checks and progress
# --------------------------------------------------------------------------------------------


def _check_start(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigurationError(
            f"x must be a torch.Tensor of start noise, found {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise ConfigurationError(f"x must be a floating-point tensor, found dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ConfigurationError(
            f"x must have a non-empty leading batch dimension, found shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ConfigurationError("the start noise x contains NaN or Inf values")
    return x


def _evaluate(velocity: Velocity, x: torch.Tensor, tau: float, where: str) -> torch.Tensor:
    """One network evaluation at a batch-shared ``tau``, returned in ``x``'s dtype."""
    tau_batch = torch.full((x.shape[0],), tau, dtype=_tau_dtype(x), device=x.device)
    out = velocity(x, tau_batch)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigurationError(
            f"velocity(x, tau) must return a tensor shaped like x {tuple(x.shape)}, "
            f"found {found} at {where}"
        )
    return out.to(x.dtype)


_NON_FINITE_HINT = (
    "the velocity function (model weights, dtype overflow) or the Brownian source returned "
    "non-finite values"
)


class _Steps:
    """A tqdm bar or a ``callback(done, total)`` over sampler steps, or nothing."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.total = total
        self.done = 0
        self.bar = None
        self.callback = None
        if callable(progress):
            self.callback = progress
        elif progress:
            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# SDE
# --------------------------------------------------------------------------------------------


def _brownian_increment(
    x: torch.Tensor,
    step: int,
    brownian: BrownianSource | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if brownian is None:
        device = generator.device if generator is not None else x.device
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
        return xi.to(x.device)
    xi = brownian(step)
    if not isinstance(xi, torch.Tensor):
        raise ConfigurationError(
            f"brownian({step}) must return a tensor shaped like x {tuple(x.shape)}, "
            f"found {type(xi).__name__}"
        )
    if xi.shape != x.shape:
        raise ConfigurationError(
            f"brownian({step}) must return a tensor shaped like x {tuple(x.shape)}, "
            f"found shape {tuple(xi.shape)}"
        )
    return xi.to(device=x.device, dtype=x.dtype)


def sample_sde(
    velocity: Velocity,
    x: torch.Tensor,
    *,
    num_steps: int = DEFAULT_NUM_STEPS["sde"],
    brownian: BrownianSource | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = False,
    last_t: float = OFFICIAL_LAST_T,
) -> torch.Tensor:
    """The official Euler–Maruyama SDE sampler, from start noise ``x`` to data.

    In network time ``t`` (0 = noise) on the grid ``t_i = last_t * i / (N - 1)``,
    ``dt = last_t / (N - 1)``, with the SiT velocity ``v = -velocity(x, 1 - t)``:

    * for ``i = 0 .. N - 2``: ``x <- x + ((1 + t_i) v - x) dt + sqrt(2 (1 - t_i)) sqrt(dt) xi_i``
      (drift ``v + w * score`` with ``w = 1 - t`` and ``score = (t v - x) / (1 - t)``,
      simplified so that no division by ``1 - t`` is rounded);
    * then the noise-free "Mean" step at ``t = last_t``: ``x <- x + ((1 + t) v - x) (1 - last_t)``.

    ``num_steps = N`` is the number of grid points and of network evaluations (NFE = N).
    ``xi_i`` is ``brownian(i)`` for ``i = 0 .. N - 2`` when a source is given (then no other
    random numbers are drawn), else ``torch.randn`` with ``generator``.

    The ``tau`` passed to ``velocity`` is ``1 - t_i`` rounded once from the exact decimal grid
    (so ``tau = 0.7`` is exactly ``0.7`` when the grid hits it, e.g. N = 49), then cast to
    float32 (float64 if ``x`` is float64). The official float32 ``1 - linspace(...)`` can land one
    ulp off such points; for N = 250 no grid point lies on 0.7 and the two agree.

    ``progress``: ``True`` for a tqdm bar, or ``callback(done, total)`` called after each step.
    """
    x = _check_start(x)
    grid, dt = _sde_schedule(num_steps, last_t)
    steps = _Steps(progress, num_steps, "SDE")
    watch = FirstNonFinite(x.shape[0], x.device)
    dt_f = float(dt)
    sqrt_dt = math.sqrt(dt_f)
    try:
        with torch.no_grad():
            for i, t in enumerate(grid[:-1]):
                where = f"SDE step {i} of {num_steps} (t = {float(t):.6g})"
                v = -_evaluate(velocity, x, float(1 - t), where)
                drift = float(1 + t) * v - x
                noise_scale = math.sqrt(2.0 * float(1 - t))
                xi = _brownian_increment(x, i, brownian, generator)
                x = x + drift * dt_f + noise_scale * (xi * sqrt_dt)
                watch.update(x, i)
                steps.step()
            t_last = grid[-1]
            where = f"the final Mean step (SDE step {num_steps - 1}, t = {float(t_last):.6g})"
            v = -_evaluate(velocity, x, float(1 - t_last), where)
            x = x + (float(1 + t_last) * v - x) * float(1 - t_last)
            watch.update(x, num_steps - 1)
            steps.step()
    finally:
        steps.close()
    watch.check(
        "sampling",
        lambda k: (
            f"SDE step {k} of {num_steps} (t = {float(grid[k]):.6g}, "
            f"tau = {float(1 - grid[k]):.6g})"
        ),
        _NON_FINITE_HINT,
    )
    return x


# --------------------------------------------------------------------------------------------
# ODE
# --------------------------------------------------------------------------------------------


def _check_solver(solver: object) -> str:
    name = solver.lower() if isinstance(solver, str) else None
    if name not in _SOLVERS:
        raise ConfigurationError(f"solver must be one of {', '.join(_SOLVERS)}, found {solver!r}")
    return name


def sample_ode(
    velocity: Velocity,
    x: torch.Tensor,
    *,
    num_steps: int = DEFAULT_NUM_STEPS["ode"],
    solver: str = DEFAULT_SOLVER,
    progress: Progress = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE ``dx/dtau = velocity(x, tau)`` from tau = 1 to 0.

    For the linear path the PF-ODE velocity is the flow-matching velocity itself, so this is a
    deterministic map from start noise to data. ``num_steps`` is the number of equal intervals
    ``tau_k = 1 - k / num_steps``:

    * ``"euler"``: ``x <- x + h f(x, tau_k)``, first order, NFE = ``num_steps``;
    * ``"heun"`` (default): predictor ``x' = x + h f(x, tau_k)``, corrector
      ``x <- x + h/2 (f(x, tau_k) + f(x', tau_{k+1}))``, second order, NFE = ``2 * num_steps``.
      The corrector is kept on the last interval too (it evaluates at ``tau = 0``, where the
      velocity is finite): dropping it would save one of ``2 N`` evaluations only.

    with ``h = -1 / num_steps``. ``progress`` is as in :func:`sample_sde` (one tick per interval).
    """
    x = _check_start(x)
    _check_num_steps(num_steps)
    name = _check_solver(solver)
    taus = [Fraction(num_steps - k, num_steps) for k in range(num_steps + 1)]
    h = -1.0 / num_steps
    steps = _Steps(progress, num_steps, f"ODE ({name})")
    watch = FirstNonFinite(x.shape[0], x.device)
    try:
        with torch.no_grad():
            for k in range(num_steps):
                where = f"ODE interval {k} of {num_steps} (tau = {float(taus[k]):.6g})"
                f0 = _evaluate(velocity, x, float(taus[k]), where)
                x_euler = x + h * f0
                if name == "euler":
                    x = x_euler
                else:
                    where = f"ODE interval {k} corrector (tau = {float(taus[k + 1]):.6g})"
                    f1 = _evaluate(velocity, x_euler, float(taus[k + 1]), where)
                    x = x + (0.5 * h) * (f0 + f1)
                watch.update(x, k)
                steps.step()
    finally:
        steps.close()
    watch.check(
        "sampling",
        lambda k: (
            f"ODE interval {k} of {num_steps} "
            f"(tau {float(taus[k]):.6g} -> {float(taus[k + 1]):.6g})"
        ),
        _NON_FINITE_HINT,
    )
    return x


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def sample(
    velocity: Velocity,
    x: torch.Tensor,
    *,
    mode: str = DEFAULT_MODE,
    num_steps: int | None = None,
    solver: str = DEFAULT_SOLVER,
    brownian: BrownianSource | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """Sample from start noise ``x`` (tau = 1) to data with ``mode`` "sde" or "ode".

    ``mode`` is case-insensitive. "sde" is :func:`sample_sde` (always Euler–Maruyama, NFE =
    ``num_steps``; ``solver`` is validated but has no effect). "ode" is :func:`sample_ode`
    (``num_steps`` intervals; NFE = ``num_steps`` for Euler, ``2 * num_steps`` for Heun).
    ``num_steps=None`` takes the mode's own default (:data:`selfflow.sampling.defaults.DEFAULT_NUM_STEPS`:
    250 for the SDE, the paper's protocol; 50 for the ODE).
    ``brownian`` and ``generator`` are used by the SDE only.
    """
    name = mode.lower() if isinstance(mode, str) else None
    if name not in _MODES:
        raise ConfigurationError(f"mode must be 'sde' or 'ode' (any case), found {mode!r}")
    solver_name = _check_solver(solver)
    if num_steps is None:
        num_steps = default_num_steps(name)
    if name == "sde":
        return sample_sde(
            velocity,
            x,
            num_steps=num_steps,
            brownian=brownian,
            generator=generator,
            progress=progress,
        )
    return sample_ode(velocity, x, num_steps=num_steps, solver=solver_name, progress=progress)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


def _check_guidance(cfg_scale: object, guidance_interval: object) -> tuple[float, float, float]:
    if (
        isinstance(cfg_scale, bool)
        or not isinstance(cfg_scale, int | float)
        or not math.isfinite(cfg_scale)
        or cfg_scale < 0
    ):
        raise ConfigurationError(f"cfg_scale must be a finite number >= 0, found {cfg_scale!r}")
    if (
        not isinstance(guidance_interval, Sequence)
        or isinstance(guidance_interval, str)
        or len(guidance_interval) != 2
    ):
        raise ConfigurationError(
            f"guidance_interval must be a pair (low, high), found {guidance_interval!r}"
        )
    low, high = guidance_interval
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ConfigurationError(
                f"guidance_interval bounds must be numbers, found {guidance_interval!r}"
            )
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigurationError(
            f"guidance_interval must satisfy 0 <= low <= high <= 1, found ({low!r}, {high!r})"
        )
    return float(cfg_scale), float(low), float(high)


def guided_velocity(
    model_fn: ModelFn,
    labels: torch.Tensor,
    *,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
    null_label: int,
) -> Velocity:
    """Turn a class-conditional ``model_fn(x, tau, y)`` into a velocity function with CFG.

    Inside ``low <= tau <= high`` (inclusive, compared in ``tau``'s dtype) and with
    ``cfg_scale != 1``, the conditional and null passes run as one batched call on
    ``cat([x, x])`` with labels ``cat([labels, null])`` and are combined as
    ``v_null + s (v_cond - v_null)`` (the official guidance rule). Otherwise only the conditional pass runs, so
    the unguided noisy part of the path and cfg 1.0 cost one pass. With guidance the interval
    test reads ``tau`` on the host once per call.

    ``null_label`` is the network's unconditional label (``model.config.null_class``: 1000 for
    the released model); the caller names it, since a sampler knows a velocity function, not
    the network and its label table.
    """
    scale, low, high = _check_guidance(cfg_scale, guidance_interval)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        found = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ConfigurationError(f"labels must be a 1-D integer tensor, found {found}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigurationError(f"labels must be an integer tensor, found dtype {labels.dtype}")
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ConfigurationError(f"null_label must be an integer >= 0, found {null_label!r}")

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != labels.shape[0] or tau.shape != (x.shape[0],):
            raise ConfigurationError(
                f"guided velocity was built for {labels.shape[0]} labels; found x of shape "
                f"{tuple(x.shape)} and tau of shape {tuple(tau.shape)} (expected ({labels.shape[0]},))"
            )
        y = labels.to(x.device)
        if scale == 1.0:
            return model_fn(x, tau, y)
        low_t = torch.tensor(low, dtype=tau.dtype, device=tau.device)
        high_t = torch.tensor(high, dtype=tau.dtype, device=tau.device)
        inside = (tau >= low_t) & (tau <= high_t)
        if not bool(inside.any()):
            return model_fn(x, tau, y)
        both = model_fn(
            torch.cat([x, x]),
            torch.cat([tau, tau]),
            torch.cat([y, torch.full_like(y, null_label)]),
        )
        v_cond, v_null = both.chunk(2)
        guided = v_null + scale * (v_cond - v_null)
        if bool(inside.all()):
            return guided
        # Mixed times (never produced by the samplers here): unguided samples keep v_cond.
        mask = inside.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, guided, v_cond)

    return velocity
