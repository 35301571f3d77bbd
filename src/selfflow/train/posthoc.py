"""Post-hoc EMA in a run: the tracked power-function EMAs, their snapshots, and the export of
any EMA length reconstructed from them (the maths: :mod:`selfflow.train.phema`).

``selfflow train --posthoc-ema 0.05 0.10 --snapshot-every K`` keeps one float32 copy of the
weights per σ_rel beside the recipe's EMA (which stays the teacher and the per-checkpoint
export), updated after every optimiser step with ``β_t = (1 − 1/t)^(γ+1)``. They live like the
recipe's EMA: built as exact copies before any wrapping, sharded the same way under ``--fsdp``
(so an update pairs shard with shard), saved whole in every training checkpoint and restored
from it bit for bit. Every K steps (and at the last step) all of them are written to

    RUN/phema/step_000001000.pt   {format, version, step, sigma_rels, gammas, states, config, card}

atomically, *before* that step's checkpoint (a checkpoint is then never ahead of its
snapshot: a run killed between the two redoes the step and writes the same bytes). Snapshots
are never pruned: the reconstruction needs all of them.

``selfflow export RUN OUT.pt --ema-length σ [--step N]`` (:func:`export_posthoc_ema`) solves
for the snapshot coefficients whose combined profile is nearest the target's, and writes the
combination in the sampler's format, with the run's card and ``ema_length`` = σ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfflow.base.errors import CheckpointError, ConfigurationError
from selfflow.model.checkpoint import torch_load_verified
from selfflow.model.network import ModelConfig
from selfflow.train import phema
from selfflow.train import state as run_state
from selfflow.train.ema import make_ema, update_ema
from selfflow.train.export import Exported, check_export_path, checkpoint_card, write_export

SNAPSHOT_DIR = "phema"
FORMAT = "selfflow-phema-snapshot"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{9})\.pt$")
#: a reconstruction whose profile misses the target by more than this is reported as poor
POOR_MATCH = 0.05


def snapshot_path(run: Path, step: int) -> Path:
    return Path(run) / SNAPSHOT_DIR / f"step_{step:09d}.pt"


def list_snapshots(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every snapshot in the run, oldest first."""
    folder = Path(run) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))


class PosthocEMA:
    """The run's power-function EMAs, one module per σ_rel (none: every method is a no-op)."""

    def __init__(self, sigma_rels: Sequence[float], modules: list[nn.Module], every: int) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [phema.gamma_of(s) for s in self.sigma_rels]
        self.modules = modules
        self.every = every

    @classmethod
    def build(
        cls,
        settings: Any,
        model: nn.Module,
        restored: tuple[dict[str, Any], Path] | None,
        device: torch.device,
    ) -> PosthocEMA:
        """Exact float32 copies of ``model`` (the weights before step 1, overwritten whole by
        the first update), or the states of the checkpoint a resume starts from."""
        sigma_rels = tuple(getattr(settings, "posthoc_ema", ()) or ())
        modules = [make_ema(model) for _ in sigma_rels]
        if sigma_rels and restored is not None:
            state, path = restored
            entry = state.get("posthoc_ema")
            stored = None if entry is None else [float(s) for s in entry["sigma_rels"]]
            if stored != list(sigma_rels):
                held = "none" if stored is None else f"those of σ_rel {stored}"
                raise CheckpointError(
                    f"{path} holds {held} among its post-hoc EMAs; this run tracks σ_rel "
                    f"{list(sigma_rels)}"
                )
            for module, values in zip(modules, entry["states"], strict=True):
                module.load_state_dict(values, strict=True)
        return cls(sigma_rels, [m.to(device) for m in modules], settings.snapshot_every or 0)

    def update(self, model: nn.Module, step: int) -> None:
        """After optimiser step ``step`` (from 1): ``ema ← β·ema + (1 − β)·θ`` for each."""
        for gamma, module in zip(self.gammas, self.modules, strict=True):
            update_ema(module, model, phema.beta(gamma, step))

    def due(self, step: int, end: int) -> bool:
        return bool(self.modules) and (step % self.every == 0 or step == end)

    def full_states(self, trainer: Any) -> list[dict[str, Any]]:
        """Full CPU state dicts on the main process (a collective under FSDP)."""
        states = []
        for module in self.modules:
            _, values, _ = run_state.full_state_dicts(
                module,
                module,
                None,  # type: ignore[arg-type]  # not read with ema_only
                sharded=trainer.sharded,
                is_main=trainer.context.is_main,
                ema_only=True,
            )
            states.append(values)
        return states

    def checkpoint_entry(self, trainer: Any) -> dict[str, Any] | None:
        """What a training checkpoint holds of them (None when none are tracked, so the
        recipe's checkpoints are as they were)."""
        if not self.modules:
            return None
        return {"sigma_rels": self.sigma_rels, "states": self.full_states(trainer)}

    def snapshot_if_due(self, trainer: Any, step: int, end: int) -> None:
        """Write step ``step``'s snapshot when it is due (rank 0 writes; all ranks wait)."""
        from selfflow.base import distributed

        if not self.due(step, end):
            return
        states = self.full_states(trainer)
        if trainer.context.is_main:
            snapshot = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "step": step,
                "sigma_rels": self.sigma_rels,
                "gammas": self.gammas,
                "states": states,
                "config": trainer.resolved.model.to_dict(),
                "card": trainer.card.to_dict(),
            }
            run_state.atomic_save(snapshot, snapshot_path(trainer.run_dir, step))
        distributed.barrier(trainer.context)


# -- the export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PosthocExported(Exported):
    """What :func:`export_posthoc_ema` wrote: :class:`Exported`'s fields (``checkpoint`` is the
    snapshot of ``step``), the σ_rel, the profile's relative residual and the snapshots used."""

    sigma_rel: float = 0.0
    residual: float = 0.0
    snapshots: int = 0
    tracked: tuple[float, ...] = ()

    def summary(self) -> str:
        names = [c.name for c in self.card.classes(self.num_classes)]
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        vae = self.card.vae or "none (latents not made by a VAE)"
        tracked = ", ".join(f"{s:g}" for s in self.tracked)
        quality = (
            f"; poorly matched (over {POOR_MATCH:.0%}): choose a σ_rel nearer the tracked ones, "
            f"or snapshot more often"
            if self.residual > POOR_MATCH
            else ""
        )
        return (
            f"wrote {self.path}: the post-hoc EMA of σ_rel {self.sigma_rel:g} at step "
            f"{self.step}, reconstructed from {self.snapshots} snapshots of σ_rel {tracked}; "
            f"its averaging profile matches the target's within {self.residual:.3%} "
            f"(relative L2 residual){quality}; {len(names)} classes ({shown}); VAE {vae}"
        )


def _read_snapshot(path: Path, step: int) -> dict[str, Any]:
    state = torch_load_verified(path, mmap=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfflow post-hoc EMA snapshot")
    if state.get("version") != FORMAT_VERSION or int(state.get("step", -1)) != step:
        raise CheckpointError(
            f"{path}: expected snapshot version {FORMAT_VERSION} of step {step}; found version "
            f"{state.get('version')} of step {state.get('step')}"
        )
    return state


def _chosen_step(run: Path, found: list[tuple[int, Path]], step: int | None) -> int:
    if not found:
        raise ConfigurationError(
            f"--ema-length: {run} holds no post-hoc EMA snapshots ({SNAPSHOT_DIR}/step_N.pt); "
            f"train it with --posthoc-ema SIGMA_REL ... --snapshot-every K"
        )
    steps = [s for s, _ in found]
    if step is None:
        return steps[-1]
    if step not in steps:
        shown = steps if len(steps) <= 12 else [*steps[:5], "…", *steps[-5:]]
        raise ConfigurationError(
            f"--step {step}: {run} has no post-hoc EMA snapshot of that step; it has "
            f"{len(steps)}: {', '.join(map(str, shown))}"
        )
    return step


def reconstruct(
    snapshots: Sequence[dict[str, Any]], sigma_rel: float, step: int
) -> tuple[dict[str, torch.Tensor], phema.Reconstruction]:
    """The EMA of ``sigma_rel`` at ``step`` from the snapshots (each one's tracked states):
    the least-squares coefficients, applied to the weights in float64, returned in float32."""
    gammas = [g for snap in snapshots for g in snap["gammas"]]
    steps = [int(snap["step"]) for snap in snapshots for _ in snap["gammas"]]
    solution = phema.solve(gammas, steps, phema.gamma_of(sigma_rel), step)
    states = [values for snap in snapshots for values in snap["states"]]
    result: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        total = torch.zeros(first.shape, dtype=torch.float64)
        for weight, values in zip(solution.coefficients.tolist(), states, strict=True):
            total += weight * values[key].double()
        result[key] = total.to(first.dtype)
    return result, solution


def export_posthoc_ema(
    run_dir: str | os.PathLike,
    sigma_rel: float,
    out_path: str | os.PathLike,
    step: int | None = None,
) -> PosthocExported:
    """Write the EMA of ``sigma_rel`` at snapshot step ``step`` (default: the newest) of the
    run ``run_dir``, reconstructed from its post-hoc EMA snapshots up to that step, in the
    sampler's format with the run's card (``ema_length`` = ``sigma_rel``). Every argument is
    checked before a snapshot is read."""
    sigma_rel = phema.check_sigma_rel(sigma_rel, "--ema-length")
    run, out = Path(run_dir), check_export_path(out_path)
    if not run.is_dir():
        raise ConfigurationError(
            f"--ema-length reconstructs from a run folder's snapshots; {run} is not a folder"
        )
    found = list_snapshots(run)
    step = _chosen_step(run, found, step)
    snapshots = [_read_snapshot(path, s) for s, path in found if s <= step]
    first = snapshots[-1]
    for snap in snapshots:
        if snap["config"] != first["config"] or snap["sigma_rels"] != first["sigma_rels"]:
            raise CheckpointError(
                f"the snapshots of {run} of steps {snap['step']} and {step} belong to different "
                f"runs (model or σ_rel differ)"
            )
    path = snapshot_path(run, step)
    config = ModelConfig.from_dict(dict(first["config"]))
    card = replace(checkpoint_card(first, path), ema_length=sigma_rel)
    weights, solution = reconstruct(snapshots, sigma_rel, step)
    written = write_export(config, weights, out, card)
    return PosthocExported(
        written,
        step,
        path,
        card,
        config.num_classes,
        sigma_rel=sigma_rel,
        residual=solution.residual,
        snapshots=len(snapshots) * len(first["sigma_rels"]),
        tracked=tuple(float(s) for s in first["sigma_rels"]),
    )
