"""Training Self-Flow: the objective (dual-timestep scheduling, EMA self-distillation).

The objective is a set of plain functions over tensors and any network called like
:class:`~selfflow.model.SelfFlowDiT`; the trainer (loop, checkpoints, processes) builds on it.
"""

from __future__ import annotations

from selfflow.train.objective import (
    dual_timesteps,
    noised_input,
    representation_loss,
    self_flow_loss,
)

__all__ = [
    "dual_timesteps",
    "noised_input",
    "representation_loss",
    "self_flow_loss",
]
