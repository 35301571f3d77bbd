"""``selfflow sweep``: FID over sampling settings and checkpoints, one FID batch per cell.

Researchers choose the guidance scale, the guidance interval and the EMA length by sweeping
FID, and the best values move as training goes on. A sweep is the product of its axes
(checkpoint or run folder × EMA length × mode × steps × guidance scale × interval); each
combination is a *cell*, and each cell is an ordinary FID-batch folder ``SWEEP/CELL/`` made by
:func:`selfflow.batch.generate_fid_batch` with a :class:`~selfflow.batch.BatchConfig`, exactly
what ``selfflow sample --eval-ref`` makes. So a cell resumes shard by shard, runs under
torchrun like ``sample``, and its numbers are those of ``sample`` + ``evaluate`` run by hand.

What the sweep adds:

- **A record per cell** (``SWEEP/CELL/sweep_N.json``): the settings that decide its numbers
  (the checkpoint's sha256 included) and its row of results. A cell whose record matches the
  request is finished and is never sampled again; a cell sampled with other settings (seed,
  batch size, VAE, ...) is refused before any work, as its folder could not be continued.
  Records are per N, so a sweep at 10 000 images and its best cells at 50 000 keep both rows
  (the larger run reuses the smaller one's images, as ``sample`` does).
- **One plan for all processes**: rank 0 checks everything (files, intervals, the sampler's
  own checks of every cell, the post-hoc EMA exports) before the first image is sampled, and
  the other processes follow its decision.
- **Guidance scale 1.0 is one cell**: without guidance the interval changes nothing (the FID
  batch's manifest drops it too), so the unguided cell is sampled once and drawn on every
  interval's line.
- **Reference statistics once**: the evaluator caches the reference batch's features by its
  sha256 (and the graph's); the first cell computes them, every later cell reads them.

Results (``results.csv``, ``results.json``, ``results.md``, ``fid.png``) are written by
:mod:`selfflow.research.results` from every record in the folder after each cell, so a rerun
with more values adds rows and redraws.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError, ReportedOnRankZero
from selfflow.base.files import replaced_atomically
from selfflow.base.lock import FolderLock
from selfflow.research.plan import (
    RECORD_FORMAT,
    Cell,
    PlannedCell,
    SweepConfig,
    SweepPlan,
    cell_batch_config,
    check_config,
    parse_interval,
    plan_sweep,
    record_name,
    request_of,
)

__all__ = ["SweepConfig", "dry_run", "run_sweep"]


# ----------------------------------------------------------------------------------------------
# Running


def _print(message: str) -> None:
    print(message, flush=True)


def agreed_plan(
    config: SweepConfig, context: distributed.DistributedContext, lock: FolderLock
) -> SweepPlan:
    """Rank 0 locks the sweep folder and plans; the others learn the plan or that it failed
    (rank 0 prints the reason, once)."""
    if not context.is_main:
        plan = distributed.broadcast_object(context, None)
        if isinstance(plan, str):
            raise ReportedOnRankZero(plan)
        return plan
    try:
        check_config(config)  # the cheap checks, before the folder is made
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        lock.acquire()
        plan = plan_sweep(config, context)
    except BaseException as error:
        distributed.broadcast_object(context, f"rank 0 stopped: {error}")
        raise
    return distributed.broadcast_object(context, plan)


def run_sweep(
    config: SweepConfig,
    *,
    context: distributed.DistributedContext | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict] | None:
    """Sample and evaluate every cell not finished yet, on one process or under torchrun
    (every process calls this with the same config); write the results after each cell.

    Returns every row of the folder on rank 0 (None elsewhere); the best cell is the last
    line logged.
    """
    with distributed.session(config.base.device, context) as context:
        return _sweep(config, context, progress, log or _print)


def _sweep(
    config: SweepConfig,
    context: distributed.DistributedContext,
    progress: bool,
    log: Callable[[str], None],
) -> list[dict] | None:
    from selfflow.research import results

    log = log if context.is_main else (lambda message: None)
    lock = FolderLock(config.output_dir, command="selfflow sweep")
    try:
        plan = agreed_plan(config, context, lock)
        pending = plan.pending
        log(
            f"selfflow sweep: {len(plan.cells)} cells, {len(plan.cells) - len(pending)} finished "
            f"before, {len(pending)} to run ({config.base.num_samples} images each) in "
            f"{config.output_dir}"
        )
        started = time.perf_counter()
        for number, planned in enumerate(pending, 1):
            log(f"cell {number}/{len(pending)}: {planned.cell.name}")
            _run_cell(config, planned, context, progress, log)
            if context.is_main:
                results.write_results(config.output_dir)
                log(_eta(started, number, len(pending)))
            distributed.wait_for_all(context)  # rank 0 evaluated; the next cell starts together
        if not context.is_main:
            return None
        rows = results.write_results(config.output_dir)
        for line in results.summary_lines(rows, config.output_dir):
            log(line)
        return rows
    finally:
        lock.release()


def _eta(started: float, done: int, total: int) -> str:
    spent = time.perf_counter() - started
    left = spent / done * (total - done)
    return f"  {done}/{total} cells in {_duration(spent)}" + (
        f"; about {_duration(left)} left at this rate" if done < total else ""
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _run_cell(
    config: SweepConfig,
    planned: PlannedCell,
    context: distributed.DistributedContext,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """The cell's FID batch with ``--eval-ref`` (what ``selfflow sample`` runs), then its record
    (rank 0)."""
    from selfflow import batch

    started = time.perf_counter()
    batch_config = cell_batch_config(config, planned.cell, planned.checkpoint)
    result = batch.generate_fid_batch(batch_config, context=context, progress=progress, log=log)
    if not context.is_main:
        return
    if result is None or not result.metrics:
        raise ConfigurationError(f"{batch_config.output_dir}: the FID batch returned no metrics")
    dtype = str(distributed.resolve_dtype(config.base.dtype, context.device)).removeprefix("torch.")
    row = _row(config, planned, result, time.perf_counter() - started, context.world_size)
    record = {"format": RECORD_FORMAT, "request": request_of(config, planned, dtype), "row": row}
    path = Path(batch_config.output_dir) / record_name(config.base.num_samples)
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    log(f"  {planned.cell.name}: FID {row['fid']}, {row['seconds']} s")


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _row(config: SweepConfig, planned: PlannedCell, result: Any, seconds: float, world: int):
    """One line of the results: the cell's axes, its numbers and its cost."""
    cell, metrics = planned.cell, result.metrics
    rate = result.images_per_second if result.new_samples else None
    return {
        "cell": cell.name,
        "checkpoint": cell.source,
        "checkpoint_sha256": planned.checkpoint_sha256,
        "ema_length": cell.ema_length,
        "cfg_scale": cell.cfg_scale,
        "guidance_interval": cell.interval_text,
        "mode": cell.mode.upper(),
        "num_steps": cell.num_steps,
        "num_samples": int(result.num_samples),
        "seed": int(config.base.seed),
        "fid": _finite(metrics["fid"]),
        "sfid": _finite(metrics["sfid"]),
        "inception_score": _finite(metrics["inception_score"]),
        "precision": _finite(metrics["precision"]),
        "recall": _finite(metrics["recall"]),
        "seconds": round(seconds, 3),
        "sampled_images": int(result.new_samples),
        "images_per_second": None if rate is None else round(rate, 4),
        "processes": int(world),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# The dry run


def relative_cost(cell: Cell, solver: str) -> float:
    """Network evaluations per image, a guided evaluation counting twice (the conditional and
    the null label) over the share of the path inside the interval: what the time scales with."""
    evaluations = cell.num_steps * (2 if cell.mode == "ode" and solver == "heun" else 1)
    guided_share = 0.0 if cell.interval is None else cell.interval[1] - cell.interval[0]
    return evaluations * (1.0 + guided_share)


def first_rate(config: SweepConfig) -> tuple[dict, float] | None:
    """The first finished cell of the folder that sampled images, and its seconds per unit of
    :func:`relative_cost` per image; None before any cell has run."""
    from selfflow.research.results import read_rows

    rows = [row for row in read_rows(config.output_dir) if row.get("images_per_second")]
    if not rows:
        return None
    row = min(rows, key=lambda r: r.get("finished") or "")
    interval = parse_interval(row["guidance_interval"]) if row["guidance_interval"] else None
    cell = Cell("", "", None, row["cfg_scale"], interval, row["mode"].lower(), row["num_steps"])
    return row, 1.0 / (row["images_per_second"] * relative_cost(cell, config.base.solver))


def dry_run(config: SweepConfig) -> list[str]:
    """The cells, what they sample and how long it should take; nothing is written (rank 0
    answers, the other processes of a torchrun job return nothing)."""
    from selfflow.research.results import number_text

    context = distributed.planning_context(config.base.device)
    if not context.is_main:
        return []
    plan = plan_sweep(config, context, export=False)
    n = config.base.num_samples
    pending = plan.pending
    lines = [
        f"selfflow sweep --dry-run: {len(plan.cells)} cells in {config.output_dir} "
        f"({len(plan.cells) - len(pending)} finished, {len(pending)} to run), {n} images each"
    ]
    width = max(len(p.cell.name) for p in plan.cells)
    for planned in plan.cells:
        if planned.done:
            state = f"finished: FID {number_text(planned.record['row']['fid'])}"
        elif planned.checkpoint is None:
            state = "to run, after its post-hoc EMA export"
        else:
            state = "to run"
        lines.append(f"  {planned.cell.name:<{width}}  {state}")
    lines.append(
        f"images to sample: {n * len(pending)} (a cell begun before continues where it stopped)"
    )
    known = first_rate(config)
    if not pending:
        lines.append("time: nothing to sample")
    elif known is None:
        lines.append("time: unknown until the first cell has run (then a dry run estimates it)")
    else:
        row, seconds_per_cost = known
        cost = sum(relative_cost(p.cell, config.base.solver) for p in pending)
        per_process = row["images_per_second"] / max(1, row["processes"])
        lines.append(
            f"time: about {_duration(seconds_per_cost * cost * n)} of sampling at the rate of "
            f"{row['cell']} ({row['images_per_second']:.3g} images/s on {row['processes']} "
            f"process(es), {per_process:.3g} each), scaled by network evaluations per image; "
            f"evaluation comes on top"
        )
    return lines
