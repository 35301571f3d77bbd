"""The sampler's settings: one definition, its defaults and its checks, free of torch.

:class:`SamplerSettings` is what the Python API, ``selfflow generate`` and the FID batch pass
to the sampler. Its checks run once, when it is made; a caller that reports errors in its own
words (the command line names ``--num-steps``, Python ``num_steps``) passes its names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import InitVar, dataclass

from selfflow.base.errors import ConfigurationError
from selfflow.sampling.defaults import default_num_steps

MODES = ("sde", "ode")
SOLVERS = ("euler", "heun")
DEFAULT_MODE = "sde"  # the paper's protocol: the SDE, 250 steps, no guidance
DEFAULT_SOLVER = "heun"
DEFAULT_CFG_SCALE = 1.0  # 1.0: the conditional prediction alone (no guidance)
DEFAULT_GUIDANCE_INTERVAL = (0.0, 0.7)  # guidance applies while low <= tau <= high
DEFAULT_SEED = 31

PYTHON_NAMES = {
    "num_steps": "num_steps",
    "mode": "mode",
    "solver": "solver",
    "cfg_scale": "cfg_scale",
    "guidance_low": "guidance_interval[0]",
    "guidance_high": "guidance_interval[1]",
}
OPTION_NAMES = {
    "num_steps": "--num-steps",
    "mode": "--mode",
    "solver": "--solver",
    "cfg_scale": "--cfg-scale",
    "guidance_low": "--guidance-low",
    "guidance_high": "--guidance-high",
}


@dataclass(frozen=True)
class SamplerSettings:
    """Everything besides the seed and the labels that changes the images.

    ``num_steps=None`` takes the mode's default (250 for the SDE, 50 for the ODE); ``mode``
    and ``solver`` may be given in any case and are stored in lower case. ``names`` only
    changes how errors name the values (the command line passes :data:`OPTION_NAMES`).
    """

    num_steps: int | None = None
    mode: str = DEFAULT_MODE
    solver: str = DEFAULT_SOLVER
    cfg_scale: float = DEFAULT_CFG_SCALE
    guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL
    names: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, names: Mapping[str, str] | None) -> None:
        names = names or PYTHON_NAMES
        mode, solver = self.mode, self.solver
        if not isinstance(mode, str) or mode.lower() not in MODES:
            raise ConfigurationError(f"{names['mode']} must be SDE or ODE (any case); got {mode!r}")
        if not isinstance(solver, str) or solver.lower() not in SOLVERS:
            raise ConfigurationError(f"{names['solver']} must be euler or heun; got {solver!r}")
        object.__setattr__(self, "mode", mode.lower())
        object.__setattr__(self, "solver", solver.lower())
        steps = default_num_steps(self.mode) if self.num_steps is None else self.num_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ConfigurationError(f"{names['num_steps']} must be at least 2; got {steps!r}")
        object.__setattr__(self, "num_steps", int(steps))
        cfg = self.cfg_scale
        if not math.isfinite(cfg) or cfg < 0:
            raise ConfigurationError(
                f"{names['cfg_scale']} must be >= 0 and finite (1.0 = no guidance); got {cfg}"
            )
        low, high = self.guidance_interval
        for key, value in (("guidance_low", low), ("guidance_high", high)):
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(
                    f"{names[key]} must lie in [0, 1] (a time tau); got {value}"
                )
        if low > high:
            raise ConfigurationError(
                f"{names['guidance_low']} ({low}) must not exceed {names['guidance_high']} "
                f"({high}): guidance applies while low <= tau <= high"
            )
