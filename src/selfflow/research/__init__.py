"""The research loop around the trainer: choosing sampling settings and EMA after training
(``selfflow sweep``) and looking inside the network (``selfflow probe``).

It stands beside ``train/`` and ``batch/`` and calls their public functions; it never
re-implements sampling, evaluation or the training objective. From Python::

    from selfflow.batch import BatchConfig
    from selfflow.research import SweepConfig, run_sweep

    rows = run_sweep(SweepConfig(checkpoints=["model.pt"], output_dir="sweep",
                                 base=BatchConfig(num_samples=10_000, eval_ref="REF.npz"),
                                 cfg_scales=[1.0, 1.5, 2.0], intervals=[(0.0, 0.7), (0.0, 1.0)]))

The names are loaded on first use, so that ``selfflow --help`` does not import torch.
"""

from __future__ import annotations

from selfflow.base.lazy import lazy_names

__all__ = ["SweepConfig", "dry_run", "run_sweep"]
_HOMES = {
    "SweepConfig": "selfflow.research.plan",
    "dry_run": "selfflow.research.sweep",
    "run_sweep": "selfflow.research.sweep",
}


__getattr__ = lazy_names(__name__, _HOMES)
