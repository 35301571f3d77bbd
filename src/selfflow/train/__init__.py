"""Training Self-Flow: the objective (dual-timestep scheduling, EMA self-distillation) and a
faster training forward pass with the model's parameters.

The objective is a set of plain functions over tensors and any network called like
:class:`~selfflow.model.network.SelfFlowDiT`; the trainer (loop, checkpoints, processes) builds on it:
``train(TrainConfig(...))`` is what ``selfflow train`` runs, ``export_run`` what
``selfflow export`` runs, ``export_posthoc_ema`` what ``selfflow export --ema-length``
runs (any EMA length, from a ``--posthoc-ema`` run's snapshots).
"""

from __future__ import annotations

from selfflow.train.config import TrainConfig
from selfflow.train.export import export_run
from selfflow.train.network import (
    FastTrainingDiT,
    split_times,
    straightforward_loss,
    train_step_flops,
    training_optimizer,
)
from selfflow.train.objective import (
    dual_timesteps,
    noised_input,
    representation_loss,
    self_flow_loss,
)
from selfflow.train.posthoc import PosthocExported, export_posthoc_ema
from selfflow.train.trainer import TrainResult, train

__all__ = [
    "FastTrainingDiT",
    "TrainConfig",
    "TrainResult",
    "export_run",
    "export_posthoc_ema",
    "PosthocExported",
    "dual_timesteps",
    "noised_input",
    "representation_loss",
    "self_flow_loss",
    "split_times",
    "straightforward_loss",
    "train",
    "train_step_flops",
    "training_optimizer",
]
