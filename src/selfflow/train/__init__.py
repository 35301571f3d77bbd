"""Training Self-Flow: the objective (dual-timestep scheduling, EMA self-distillation).

The objective is a set of plain functions over tensors and any network called like
:class:`~selfflow.model.SelfFlowDiT`; the trainer (loop, checkpoints, processes) builds on it:
``train(TrainConfig(...))`` is what ``selfflow train`` runs, ``export_run`` what
``selfflow export`` runs.
"""

from __future__ import annotations

from selfflow.train.config import TrainConfig
from selfflow.train.export import export_run
from selfflow.train.objective import (
    dual_timesteps,
    noised_input,
    representation_loss,
    self_flow_loss,
)
from selfflow.train.trainer import TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "export_run",
    "dual_timesteps",
    "noised_input",
    "representation_loss",
    "self_flow_loss",
    "train",
]
