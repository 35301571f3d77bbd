"""From a training run to the sampling side: the EMA weights in the sampler's checkpoint format.

An export is what :func:`selfflow.checkpoint.save_model` writes, ``{"format": "selfflow",
"config": ..., "state_dict": ...}``, with the EMA (the weights the paper samples and evaluates)
under the released key names and the model's config (any size, input shape and class count),
so :func:`selfflow.load_model`, :class:`selfflow.SelfFlowPipeline` and ``selfflow sample --ckpt``
load it strictly. The trainer writes one beside every checkpoint (``step_N-ema.pt``);
``selfflow export RUN OUT.pt`` writes one from a run's newest intact checkpoint (or a given one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from selfflow.checkpoint import save_model
from selfflow.errors import CheckpointError
from selfflow.model import ModelConfig, SelfFlowDiT
from selfflow.train import state as run_state


def write_export(config: ModelConfig, ema_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write the EMA weights with ``config`` to ``path``, atomically (no CPU copy of a model
    is built: the tensors are assigned to a model skeleton on the meta device)."""
    with torch.device("meta"):
        model = SelfFlowDiT(config)
    model.load_state_dict(dict(ema_state), strict=True, assign=True)
    with run_state.disk_full_guard(Path(path)):
        return save_model(model, path)  # atomic: temporary name, then rename


def export_run(source: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> Path:
    """Export the EMA of ``source``: a run folder (its newest intact checkpoint, or ``step``)
    or one training checkpoint file. Returns the path written."""
    source = Path(source)
    if source.is_dir():
        if step is not None:
            path = run_state.checkpoint_path(source, step)
            if not path.is_file():
                steps = [s for s, _ in run_state.list_checkpoints(source)]
                raise CheckpointError(f"{source} has no checkpoint of step {step}; it has {steps}")
            state = run_state.read_checkpoint(path)
        else:
            found = run_state.load_latest(source, print)
            if found is None:
                raise CheckpointError(
                    f"{source} holds no intact training checkpoint "
                    f"({run_state.CHECKPOINT_DIR}/step_N.pt); is it a `selfflow train` run folder?"
                )
            state, path = found
    elif source.is_file():
        state = run_state.read_checkpoint(source)
    else:
        raise CheckpointError(f"{source}: no such run folder or training checkpoint")
    config = ModelConfig.from_dict(dict(state["settings"]["model"]))
    return write_export(config, state["ema"], Path(out))
