"""The sweep's plan: its settings, its cells, the checks made before any work, and which
cells are finished.

A cell is one combination of the axes (checkpoint or run folder × EMA length × mode × steps ×
guidance scale × interval); its folder ``SWEEP/CELL/`` is an ordinary FID batch. A cell's
record, ``SWEEP/CELL/sweep_N.json``, holds the settings that decide its numbers (the
checkpoint's sha256 included) and its row of results: a cell whose record for this N matches
the request is finished and never sampled again; a cell sampled with other image settings
(seed, batch size, VAE, ...) is refused before any work, as its FID batch could not continue.

Post-hoc EMA reaches the trainer through one seam, :func:`posthoc_ema_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.files import file_sha256
from selfflow.batch import BatchConfig
from selfflow.sampling.settings import (
    DEFAULT_CFG_SCALE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_MODE,
    OPTION_NAMES,
    SamplerSettings,
)

RECORD_FORMAT = "selfflow-sweep-cell"
RECORD_GLOB = "sweep_*.json"
EMA_DIR = "ema"  # post-hoc EMA exports of run folders, made once and reused


def record_name(num_samples: int) -> str:
    """A cell's record for one N: a sweep at N and at another N keep a row each."""
    return f"sweep_{num_samples}.json"


# ----------------------------------------------------------------------------------------------
# The sweep's settings and its cells


@dataclass
class SweepConfig:
    """A sweep: its axes, its folder, and every other option of ``selfflow sample`` (``base``;
    its checkpoint, output folder, mode, steps, guidance scale and interval are the cells')."""

    checkpoints: Sequence[str | os.PathLike]
    output_dir: str | os.PathLike
    base: BatchConfig
    cfg_scales: Sequence[float] = (DEFAULT_CFG_SCALE,)
    intervals: Sequence[tuple[float, float]] = (DEFAULT_GUIDANCE_INTERVAL,)
    modes: Sequence[str] = (DEFAULT_MODE,)
    num_steps: Sequence[int | None] = (None,)  # None: the mode's default (SDE 250, ODE 50)
    ema_lengths: Sequence[float] = ()  # σ_rel of post-hoc EMA; only with run folders


@dataclass(frozen=True)
class Cell:
    """One combination of the axes: one FID batch, one row."""

    source: str  # the --ckpt as given: a checkpoint file, or a run folder with ema_length
    label: str  # a short name of the source, unique in the sweep
    ema_length: float | None
    cfg_scale: float
    interval: tuple[float, float] | None  # None: unguided (cfg 1.0), where it changes nothing
    mode: str  # "sde" or "ode"
    num_steps: int

    @property
    def name(self) -> str:
        """The cell's folder name under SWEEP: every axis, readable."""
        parts = [self.label]
        if self.ema_length is not None:
            parts.append(f"ema{self.ema_length!r}")
        parts.append(f"cfg{self.cfg_scale!r}")
        if self.interval is not None:
            parts.append(f"tau{self.interval[0]!r}-{self.interval[1]!r}")
        parts.append(f"{self.mode}{self.num_steps}")
        return "_".join(parts)

    @property
    def interval_text(self) -> str:
        return "" if self.interval is None else f"{self.interval[0]!r}:{self.interval[1]!r}"


def parse_interval(text: str) -> tuple[float, float]:
    """``"a:b"`` → ``(a, b)`` with 0 <= a < b <= 1: guidance applies while a <= τ <= b."""
    low, sep, high = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        value = (float(low), float(high))
    except ValueError:
        raise ConfigurationError(
            f"--guidance-interval takes LOW:HIGH (such as 0.0:0.7); got {text!r}"
        ) from None
    if not (0.0 <= value[0] < value[1] <= 1.0):
        raise ConfigurationError(
            f"--guidance-interval {text}: expected 0 <= LOW < HIGH <= 1 (times tau, 1 = noise)"
        )
    return value


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _labels(sources: Sequence[str]) -> dict[str, str]:
    """A short, stable name per source: its file or folder name without suffix, with its
    parent folder's name in front when two sources share a name."""
    stems = {source: Path(source).name.removesuffix(".pt").removesuffix(".safetensors")
             for source in sources}  # fmt: skip
    labels = {}
    for source, stem in stems.items():
        shared = sum(other == stem for other in stems.values()) > 1
        labels[source] = f"{Path(source).resolve().parent.name}-{stem}" if shared else stem
    if len(set(labels.values())) < len(labels):
        raise ConfigurationError(
            f"--ckpt: two checkpoints have the same name and folder name ({sorted(sources)}); "
            f"give them distinct names"
        )
    return {source: "".join(c if c.isalnum() or c in "-._" else "-" for c in label)
            for source, label in labels.items()}  # fmt: skip


def make_cells(config: SweepConfig) -> list[Cell]:
    """Every combination of the axes, in order, checked by the sampler's own settings; the
    unguided scale (1.0) is one cell for all intervals."""
    sources = _unique([str(path) for path in config.checkpoints])
    labels = _labels(sources)
    emas: list[float | None] = _unique(config.ema_lengths) or [None]
    cells: list[Cell] = []
    for source, ema, mode, steps, cfg, interval in itertools.product(
        sources,
        emas,
        _unique(config.modes),
        _unique(config.num_steps),
        _unique(config.cfg_scales),
        _unique(config.intervals),
    ):
        settings = SamplerSettings(
            steps, mode, config.base.solver, cfg, tuple(interval), names=OPTION_NAMES
        )
        guided = settings.cfg_scale != 1.0
        cells.append(
            Cell(
                source=source,
                label=labels[source],
                ema_length=None if ema is None else float(ema),
                cfg_scale=float(settings.cfg_scale),
                interval=tuple(map(float, interval)) if guided else None,
                mode=settings.mode,
                num_steps=settings.num_steps,
            )
        )
    return _unique(cells)


def cell_batch_config(config: SweepConfig, cell: Cell, checkpoint: str | None) -> BatchConfig:
    """The cell's FID batch: the sweep's sample options with the cell's axes."""
    low, high = cell.interval or DEFAULT_GUIDANCE_INTERVAL
    return dataclasses.replace(
        config.base,
        checkpoint=checkpoint,
        output_dir=Path(config.output_dir) / cell.name,
        num_steps=cell.num_steps,
        mode=cell.mode,
        cfg_scale=cell.cfg_scale,
        guidance_low=low,
        guidance_high=high,
        overwrite=False,
    )


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA: the one seam to the trainer's export


def posthoc_ema_checkpoint(run_dir: str | os.PathLike, sigma_rel: float, out_path: Path) -> Path:
    """The checkpoint to sample for the EMA of relative length ``sigma_rel`` of a run folder.

    Reconstructed from the run's post-hoc EMA snapshots by the trainer's export
    (``selfflow.train.export_posthoc_ema``) at its latest snapshot, written to ``out_path``
    once and reused by later sweeps (delete it to export again after more training).
    """
    out_path = Path(out_path)
    if out_path.is_file():
        return out_path
    export = _posthoc_export()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    export(Path(run_dir), float(sigma_rel), out_path, step=None)
    if not out_path.is_file():
        raise ConfigurationError(
            f"the post-hoc EMA export of {run_dir} at σ_rel {sigma_rel} wrote no {out_path}"
        )
    return out_path


def _posthoc_export() -> Callable[..., Any]:
    from selfflow import train

    export = getattr(train, "export_posthoc_ema", None)
    if export is None:
        raise ConfigurationError(
            "--ema-length needs post-hoc EMA export (selfflow.train.export_posthoc_ema), which "
            "this selfflow does not have; sweep checkpoint files instead"
        )
    return export


def _ema_path(config: SweepConfig, cell: Cell) -> Path:
    return Path(config.output_dir) / EMA_DIR / f"{cell.label}_ema{cell.ema_length!r}.pt"


# ----------------------------------------------------------------------------------------------
# Checks before any work


def check_config(config: SweepConfig) -> list[Cell]:
    """Everything that needs no model: the files, the axes, the sample options. Returns the
    cells."""
    base = config.base
    if not config.checkpoints:
        raise ConfigurationError("--ckpt: give at least one checkpoint file or run folder")
    if base.eval_ref is None:
        raise ConfigurationError("--eval-ref REF.npz is required: a sweep compares FIDs")
    if base.overwrite:
        raise ConfigurationError(
            "--overwrite is not a sweep option: finished cells are kept; delete a cell's folder "
            "under --output-dir to sample it again"
        )
    folders = [str(p) for p in config.checkpoints if Path(p).is_dir()]
    for path in config.checkpoints:
        if not Path(path).exists():
            raise ConfigurationError(f"--ckpt {path}: no such file or run folder")
    if config.ema_lengths:
        files = [str(p) for p in config.checkpoints if not Path(p).is_dir()]
        if files:
            raise ConfigurationError(
                f"--ema-length reconstructs the EMA of a run folder; --ckpt {files[0]} is a file"
            )
        for sigma in config.ema_lengths:
            if not (math.isfinite(sigma) and sigma > 0):
                raise ConfigurationError(f"--ema-length must be > 0 (a σ_rel); got {sigma}")
        _posthoc_export()  # refuses now, not after the first cells
    elif folders:
        raise ConfigurationError(
            f"--ckpt {folders[0]} is a folder: a run folder needs --ema-length (post-hoc EMA); "
            f"otherwise give checkpoint files"
        )
    for interval in config.intervals:
        if not (0.0 <= interval[0] < interval[1] <= 1.0):
            raise ConfigurationError(
                f"--guidance-interval {interval[0]}:{interval[1]}: expected 0 <= LOW < HIGH <= 1"
            )
    cells = make_cells(config)  # the sampler's checks of every mode, step count and scale
    probe = dataclasses.replace(cell_batch_config(config, cells[0], None), class_balanced=False)
    probe.validate()  # N, batch size, reference and Inception files
    config.base.eval_ref = probe.eval_ref  # a bare name found in selfflow's cache
    return cells


# ----------------------------------------------------------------------------------------------
# The plan: what each cell samples and whether it is finished


@dataclass
class PlannedCell:
    """A cell with what rank 0 found out: the file to sample, its sha256, and whether the
    cell's record for this N matches (finished: nothing to do)."""

    cell: Cell
    checkpoint: str | None  # None: a post-hoc EMA not exported yet (dry run)
    checkpoint_sha256: str | None
    done: bool = False
    record: dict | None = None  # the finished cell's record


@dataclass
class SweepPlan:
    cells: list[PlannedCell] = field(default_factory=list)
    world_size: int = 1

    @property
    def pending(self) -> list[PlannedCell]:
        return [planned for planned in self.cells if not planned.done]


def request_of(config: SweepConfig, planned: PlannedCell, dtype: str) -> dict[str, Any]:
    """The settings that decide a cell's numbers, as its record stores them (N apart: records
    are per N). Equal requests: the same images and the same metrics."""
    base, cell = config.base, planned.cell
    return {
        "checkpoint_sha256": planned.checkpoint_sha256,
        "ema_length": cell.ema_length,
        "cfg_scale": cell.cfg_scale,
        "guidance_interval": cell.interval_text,
        "mode": cell.mode,
        "num_steps": cell.num_steps,
        "solver": base.solver if cell.mode == "ode" else None,
        "seed": int(base.seed),
        "batch_size": int(base.batch_size),  # kernels round per batch shape
        "vae": None if base.vae is None else str(base.vae),
        "allow_vae_mismatch": bool(base.allow_vae_mismatch),
        "class_balanced": bool(base.class_balanced),
        "dtype": dtype,
        "eval_ref": str(Path(base.eval_ref).resolve()),
        "inception": None if base.inception is None else str(Path(base.inception).resolve()),
    }


def read_record(path: Path) -> dict | None:
    """A cell's record, or None when missing or unreadable (the cell is then run again: the
    FID batch itself knows what of it is finished)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    return record


IMAGE_KEYS_EXCEPT = ("eval_ref", "inception")  # the request's keys that do not change images


def _status(config: SweepConfig, planned: PlannedCell, dtype: str) -> None:
    """Mark ``planned`` done when its record for this N matches the request; refuse a folder
    sampled with other image settings, which the FID batch could not continue."""
    if planned.checkpoint_sha256 is None:
        return
    folder = Path(config.output_dir) / planned.cell.name
    request = request_of(config, planned, dtype)
    for path in sorted(folder.glob(RECORD_GLOB)):
        record = read_record(path)
        if record is None:
            continue
        stored = record.get("request", {})
        differing = [
            key
            for key in request
            if key not in IMAGE_KEYS_EXCEPT and stored.get(key) != request[key]
        ]
        if differing:
            what = "; ".join(f"{k} {stored.get(k)!r} there, {request[k]!r} now" for k in differing)
            raise ConfigurationError(
                f"{folder} was sampled with other settings ({what}): use another --output-dir, "
                f"or delete that cell's folder"
            )
        if path.name == record_name(config.base.num_samples) and stored == request:
            planned.done, planned.record = True, record


def plan_sweep(
    config: SweepConfig, context: distributed.DistributedContext, *, export: bool = True
) -> SweepPlan:
    """Rank 0's checks and decisions, all before the first image: the cells, the post-hoc EMA
    exports (``export=False``: only those that exist, for a dry run), each cell's full sample
    checks, the checkpoints' sha256 and which cells are finished."""
    from selfflow.model.checkpoint import read_card

    cells = check_config(config)
    dtype = str(distributed.resolve_dtype(config.base.dtype, context.device)).removeprefix("torch.")
    plan = SweepPlan(world_size=context.world_size)
    hashes: dict[str, str] = {}
    for cell in cells:
        checkpoint: str | None = cell.source
        if cell.ema_length is not None:
            path = _ema_path(config, cell)
            if export:
                path = posthoc_ema_checkpoint(cell.source, cell.ema_length, path)
            checkpoint = str(path) if path.is_file() else None
        if checkpoint is not None and checkpoint not in hashes:
            read_card(checkpoint)  # a readable checkpoint, not just a file
            cell_batch_config(config, cell, checkpoint).validate()
            hashes[checkpoint] = file_sha256(checkpoint)
        planned = PlannedCell(cell, checkpoint, hashes.get(checkpoint) if checkpoint else None)
        _status(config, planned, dtype)
        plan.cells.append(planned)
    return plan
