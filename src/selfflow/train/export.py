"""From a training run to the sampling side: the EMA weights in the sampler's checkpoint format.

An export is what :func:`selfflow.model.checkpoint.save_model` writes, ``{"format": "selfflow",
"config": ..., "state_dict": ...}``, with the EMA (the weights the paper samples and evaluates)
under the released key names and the model's config (any size, input shape and class count),
so :func:`selfflow.load_model`, :class:`selfflow.SelfFlowPipeline` and ``selfflow sample --ckpt``
load it strictly. The trainer writes one beside every checkpoint (``step_N-ema.pt``);
``selfflow export RUN OUT.pt`` writes one from a run's newest intact checkpoint (or a given one).
Both carry the run's card (:mod:`selfflow.model.card`): the dataset's class names and the VAE, so the
export samples, captions and decodes as it was trained without being told.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from selfflow.base.errors import CheckpointError, ConfigurationError
from selfflow.base.files import check_can_write, writing
from selfflow.model.card import RELEASED, ModelCard
from selfflow.model.checkpoint import save_model
from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.train import state as run_state

EXPORT_SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote: the file, the training step and checkpoint it came from,
    and the card it carries (classes and VAE)."""

    path: Path
    step: int
    checkpoint: Path
    card: ModelCard
    num_classes: int

    def summary(self) -> str:
        names = [c.name for c in self.card.classes(self.num_classes)]
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        vae = self.card.vae or "none (latents not made by a VAE)"
        return (
            f"wrote {self.path}: the EMA of step {self.step} (from {self.checkpoint}); "
            f"{len(names)} classes ({shown}); VAE {vae}"
        )


def check_export_path(out: str | os.PathLike) -> Path:
    """``OUT`` must name a ``.pt`` or ``.safetensors`` file in a folder that can be written:
    checked before a 10 GB checkpoint is read."""
    out = Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise ConfigurationError(
            f"OUT {out}: expected a file ending in .pt or .safetensors (the format follows "
            f"the suffix); got {out.suffix or 'no suffix'}"
        )
    if out.is_dir():
        raise ConfigurationError(f"OUT {out} is a folder; expected a .pt or .safetensors file")
    check_can_write(out.parent, f"OUT {out}")
    return out


def write_export(
    config: ModelConfig,
    ema_state: Mapping[str, torch.Tensor],
    path: Path,
    card: ModelCard | None = None,
) -> Path:
    """Write the EMA weights with ``config`` and ``card`` to ``path``, atomically (no CPU copy
    of a model is built: the tensors are assigned to a model skeleton on the meta device)."""
    with torch.device("meta"):
        model = SelfFlowDiT(config)
    model.load_state_dict(dict(ema_state), strict=True, assign=True)
    with writing(Path(path)):  # a read-only folder or a full disk: one line, no temporary
        return save_model(model, path, card=card)  # atomic: temporary name, then rename


def export_run(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None
) -> Exported:
    """Export the EMA of ``source``: a run folder (its newest intact checkpoint, or ``step``)
    or one training checkpoint file. Returns what was written (:class:`Exported`)."""
    source, out = Path(source), check_export_path(out)
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
        state, path = run_state.read_checkpoint(source), source
    else:
        raise CheckpointError(f"{source}: no such run folder or training checkpoint")
    config = ModelConfig.from_dict(dict(state["settings"]["model"]))
    card = checkpoint_card(state, path)
    written = write_export(config, state["ema"], out, card)
    return Exported(written, int(state["step"]), path, card, config.num_classes)


def checkpoint_card(state: Mapping, path: Path) -> ModelCard:
    """The card a training checkpoint carries; RELEASED for checkpoints older than cards."""
    values = state.get("card")
    if values is None:
        return RELEASED
    try:
        return ModelCard.from_dict(values)
    except ValueError as error:
        raise CheckpointError(f"{path}: the stored model card is damaged: {error}") from error
