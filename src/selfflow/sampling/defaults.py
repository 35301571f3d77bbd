"""Defaults shared by the samplers, the Python API and the command line.

Kept apart and free of heavy imports so that ``selfflow --help`` can state them without
loading torch, and so that each is defined once.
"""

from __future__ import annotations

from selfflow.base.errors import ConfigurationError

# Network evaluations (SDE) or intervals (ODE) when no step count is given. The SDE's 250 is
# the paper's protocol; the probability-flow ODE is smooth enough that 50 Heun intervals
# (100 evaluations) suffice, and 250 Heun intervals would cost 500 evaluations per image.
DEFAULT_NUM_STEPS = {"sde": 250, "ode": 50}


def default_num_steps(mode: str) -> int:
    """The step count a sampling ``mode`` ('sde' or 'ode', any case) uses by default."""
    key = mode.lower() if isinstance(mode, str) else None
    if key not in DEFAULT_NUM_STEPS:
        raise ConfigurationError(f"mode must be 'sde' or 'ode' (any case); got {mode!r}")
    return DEFAULT_NUM_STEPS[key]
