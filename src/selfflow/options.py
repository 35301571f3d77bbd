"""Command-line options shared by `selfflow sample`, `selfflow generate` and others.

One definition per option keeps the two commands' names, defaults and help in step; each
command still places them in its own argument groups.
"""

from __future__ import annotations

import argparse
from typing import Any

from selfflow.sampling.defaults import DEFAULT_NUM_STEPS
from selfflow.sampling.settings import (
    DEFAULT_CFG_SCALE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_MODE,
    DEFAULT_SEED,
    DEFAULT_SOLVER,
    MODES,
    SOLVERS,
)

OPTIONS: dict[str, dict[str, Any]] = {
    "--ckpt": dict(
        default=None,
        metavar="PATH",
        help="checkpoint file (default: download Hila/Self-Flow selfflow_imagenet256.pt)",
    ),
    "--num-steps": dict(
        type=int,
        default=None,
        help="SDE: grid points = network evaluations; ODE: intervals (Heun evaluates twice per "
        f"interval) (default: {DEFAULT_NUM_STEPS['sde']} for SDE, the paper's protocol; "
        f"{DEFAULT_NUM_STEPS['ode']} for ODE, which suffice)",
    ),
    "--mode": dict(
        type=str.upper,
        choices=tuple(mode.upper() for mode in MODES),
        default=DEFAULT_MODE.upper(),
        help="SDE (Euler-Maruyama, the paper's) or ODE (probability flow); any case (default: SDE)",
    ),
    "--seed": dict(
        type=int,
        default=DEFAULT_SEED,
        help="run seed; sample i draws from streams keyed by (seed, i) (default: %(default)s)",
    ),
    "--cfg-scale": dict(
        type=float,
        default=DEFAULT_CFG_SCALE,
        help="classifier-free guidance scale, 1.0 = none (default: %(default)s, the paper's protocol)",
    ),
    "--guidance-low": dict(
        type=float,
        default=DEFAULT_GUIDANCE_INTERVAL[0],
        help="guidance applies while tau >= this, tau = 1 being noise (default: %(default)s)",
    ),
    "--guidance-high": dict(
        type=float,
        default=DEFAULT_GUIDANCE_INTERVAL[1],
        help="guidance applies while tau <= this (default: %(default)s)",
    ),
    "--solver": dict(
        type=str.lower,
        choices=SOLVERS,
        default=DEFAULT_SOLVER,
        help="ODE solver (ignored by the SDE) (default: heun)",
    ),
    "--vae": dict(
        default=None,
        metavar="ID_OR_DIR",
        help="VAE: hub id or local diffusers folder (default: the one the checkpoint records: "
        "stabilityai/sd-vae-ft-ema for the released model, the training data's VAE for a "
        "model trained with selfflow); its encoder must be the model's (checked)",
    ),
    "--allow-vae-mismatch": dict(
        action="store_true",
        help="decode with --vae even when its encoder is not the one the model was trained on",
    ),
    "--device": dict(
        default=None,
        help="torch device; 'cuda' means cuda:LOCAL_RANK under torchrun (under srun: "
        "cuda:SLURM_LOCALID, or the task's one GPU) (default: cuda when available, else cpu)",
    ),
    "--dtype": dict(
        choices=("float32", "bfloat16"),
        default=None,
        help="network precision: float32 = the plain reference network; bfloat16 = the fast "
        "path (selfflow.model.inference) (default: bfloat16 on CUDA, float32 on CPU)",
    ),
}


def add_options(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    *names: str,
    help: dict[str, str] | None = None,
    **defaults: Any,
) -> None:
    """Add the shared options ``names`` to a parser or group; ``defaults`` overrides by dest
    (``seed=0``), ``help`` a help text by option name (what it means to that command)."""
    for name in names:
        spec = dict(OPTIONS[name])
        if help and name in help:
            spec["help"] = help[name]
        dest = name.lstrip("-").replace("-", "_")
        if dest in defaults:
            spec["default"] = defaults[dest]
        container.add_argument(name, **spec)
