"""The run folder: its settings record, checkpoints (written atomically, verified when read),
resume from the newest good one, and pruning.

Layout of ``RUN/``::

    run.json                        identity settings + dataset identity, written on the first start
    checkpoints/step_000001000.pt   training state: model, EMA, optimiser, step, config, dataset
    checkpoints/step_000001000-ema.pt   the EMA weights alone, in the sampler's format (export)
    log.jsonl, tensorboard/, samples/, eval/
    verified_shards/rank_00000.json the shards this run verified (selfflow.data.verify.ShardRecord)
    phema/step_000001000.pt         post-hoc EMA snapshots (--posthoc-ema; selfflow.train.posthoc)

A checkpoint holds no RNG state: every random number of step k comes from streams keyed by
(seed, k) (see :mod:`selfflow.train.streams`), so the step number is all a resume needs. Files
are written to a temporary name, flushed to disk and renamed, so a checkpoint is either whole
or absent; reading checks every archive entry's CRC-32 first
(:func:`selfflow.model.checkpoint.torch_load_verified`), and a damaged newest checkpoint is named and the previous one used.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfflow.base.errors import CheckpointError, ConfigurationError, DiskFullError
from selfflow.base.files import nearest_existing, replaced_atomically, writing
from selfflow.base.files import remove_temporaries as remove_temporaries_in
from selfflow.data.verify import RECORD_DIR
from selfflow.model.checkpoint import TRAINING_FORMAT_TAG, torch_load_verified

FORMAT = TRAINING_FORMAT_TAG  # the model loader reads these files too (their EMA)
FORMAT_VERSION = 1
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{9})\.pt$")
REQUIRED_KEYS = ("format", "version", "step", "model", "ema", "optimizer", "identity", "dataset")


def checkpoint_path(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINT_DIR / f"step_{step:09d}.pt"


def export_path(run: Path, step: int) -> Path:
    """The EMA export written beside each checkpoint."""
    return Path(run) / CHECKPOINT_DIR / f"step_{step:09d}-ema.pt"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every training checkpoint in the run, oldest first."""
    folder = Path(run) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def write_checkpoint(
    run: Path,
    step: int,
    *,
    model: dict[str, Any],
    ema: dict[str, Any],
    optimizer: dict[str, Any],
    identity: dict[str, Any],
    dataset: dict[str, Any],
    settings: dict[str, Any],
    images_seen: int,
    card: dict[str, Any] | None = None,
    posthoc_ema: dict[str, Any] | None = None,
) -> Path:
    """Write step ``step``'s training checkpoint atomically; returns its path.

    Here, beside :func:`read_checkpoint`, so that the format's writer and its reader (the
    entries of ``REQUIRED_KEYS``, ``FORMAT_VERSION``) live in one module. ``model``, ``ema``
    and ``optimizer`` are full state dicts (:func:`full_state_dicts`).
    """
    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "identity": identity,
        "dataset": dataset,
        "settings": settings,
        "images_seen": images_seen,
        # classes and VAE (selfflow.model.card), for `selfflow export`; absent before they existed
        "card": card,
    }
    if posthoc_ema is not None:  # --posthoc-ema's EMAs (selfflow.train.posthoc); else absent
        state["posthoc_ema"] = posthoc_ema
    return atomic_save(state, checkpoint_path(run, step))


def full_state_dicts(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sharded: bool,
    is_main: bool,
    ema_only: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Full (unsharded) CPU state dicts of model, EMA and optimiser, on the main process.

    A collective when ``sharded`` (every rank holds a shard; the main one receives the whole).
    Without sharding the other ranks return empty dicts instead of copying what rank 0 writes.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if not (sharded or is_main):
        return {}, {}, {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema_state = get_model_state_dict(ema, options=options)
    if ema_only:
        return {}, ema_state, {}
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, ema_state, optimizer_state


def atomic_save(obj: Any, path: Path, save: Callable[[Any, Path], None] | None = None) -> Path:
    """``torch.save`` (or ``save``) to a temporary name, fsync, rename: never half a file.

    A read-only folder or a full disk raises :class:`~selfflow.base.errors.CannotWriteError` (a
    :class:`DiskFullError` for the disk) naming the file, and leaves no temporary behind
    (:func:`selfflow.base.files.writing`, which also reads torch.save's "unexpected pos" error).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, fsync=True) as tmp:
        (save or torch.save)(obj, tmp)
    return path


def free_bytes(run: Path) -> int:
    """Free space where ``run`` is or will be (its nearest existing folder, for a new run)."""
    return shutil.disk_usage(nearest_existing(run)).free


def kept_checkpoints(settings: Any) -> int:
    """How many checkpoints a finished run keeps: the newest ``keep_last`` and every multiple
    of ``keep_every`` among the steps checkpointed (every ``checkpoint_every`` and the last)."""
    every, end = settings.checkpoint_every, settings.steps
    steps = sorted({*range(every, end + 1, every), end})
    return len(_kept(steps, settings.keep_last, settings.keep_every))


def check_free_space(run: Path, needed: int) -> None:
    """Refuse to start when the run folder cannot hold the next checkpoint and its export."""
    free = free_bytes(run)
    if free < needed:
        raise DiskFullError(
            f"{run} has {free / 2**20:.1f} MiB free; one checkpoint and its export need about "
            f"{needed / 2**20:.1f} MiB. Free space or choose another --output-dir"
        )


def remove_temporaries(run: Path) -> int:
    """Delete temporaries a killed run left (``.NAME.tmp-PID``); returns how many."""
    return remove_temporaries_in([Path(run), Path(run) / CHECKPOINT_DIR, Path(run) / RECORD_DIR])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, CRC-verified and checked for the entries a resume needs."""
    state = _load_mapped(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfflow training checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    if state["version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is training-checkpoint version {state['version']}; this selfflow reads "
            f"version {FORMAT_VERSION}"
        )
    return state


def _load_mapped(path: Path) -> object:
    """The checkpoint, CRC-checked and memory-mapped.

    Memory-mapped because every process reads the checkpoint at a resume: eight processes
    each loading an XL/2 state (11 GB: model, EMA, Adam moments) would hold 88 GB of copies;
    mapped, they share the page cache.
    """
    return torch_load_verified(path, mmap=True)


def load_latest(run: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads back intact; damaged ones are named and skipped."""
    for step, path in reversed(list_checkpoints(run)):
        try:
            state = read_checkpoint(path)
        except CheckpointError as error:
            log(f"warning: checkpoint {path} is damaged and is skipped ({error})")
            continue
        if int(state["step"]) != step:
            log(f"warning: {path} records step {state['step']}; skipped")
            continue
        return state, path
    return None


def _kept(steps: list[int], keep_last: int, keep_every: int | None) -> set[int]:
    """The newest ``keep_last`` of the sorted ``steps`` and every multiple of ``keep_every``."""
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {step for step in steps if step % keep_every == 0}
    return keep


def prune(run: Path, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints (and their exports), keeping every
    multiple of ``keep_every`` as a milestone. Returns the steps removed."""
    steps = [step for step, _ in list_checkpoints(run)]
    keep = _kept(steps, keep_last, keep_every)
    removed = [step for step in steps if step not in keep]
    for step in removed:
        checkpoint_path(run, step).unlink(missing_ok=True)
        export_path(run, step).unlink(missing_ok=True)
    return removed


def check_run_record(run: Path, record: dict[str, Any], *, write: bool = True) -> None:
    """Write ``run.json`` on a first start (unless ``write`` is False: a dry run); on a rerun
    refuse another run's folder.

    ``record`` holds ``identity`` (the settings that define the maths) and ``dataset`` (its
    identity digest). Settings that only say where and how fast the run is computed are not
    in it, so a resume may change them (steps, device, precision, micro-batch, intervals).
    """
    from selfflow.train.config import differences

    path = Path(run) / RUN_FILE
    if not path.exists():
        if not write:
            return
        text = json.dumps(record, indent=1, sort_keys=True) + "\n"
        atomic_save(text, path, save=lambda obj, tmp: Path(tmp).write_text(obj))
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"{path} is unreadable ({error}); it is not a run folder"
        ) from error
    found = differences(stored.get("identity", {}), record["identity"])
    if stored.get("dataset") != record["dataset"]:
        found.append(f"dataset: {stored.get('dataset')!r} → {record['dataset']!r}")
    if found:
        hint = "Rerun with that run's settings to resume it"
        if stored.get("identity", {}).get("streams_revision") != record["identity"].get(
            "streams_revision"
        ):
            hint = (
                "This selfflow draws a step's random numbers differently from the one that "
                "began the run (streams_revision); finish it with that version"
            )
        raise ConfigurationError(
            f"{run} holds a run with other settings ("
            + "; ".join(found)
            + f"). {hint}, or choose another --output-dir"
        )


def state_bytes(num_parameters: int) -> int:
    """About how large a checkpoint plus its export are: float32 model, EMA, two Adam moments,
    and the EMA again, with a little slack."""
    return int(num_parameters * 4 * 5 * 1.05) + (1 << 20)


def snapshot_plan(settings: Any, step: int, num_parameters: int) -> tuple[list[str], int]:
    """The dry run's line on the post-hoc EMA snapshots still to be written from ``step``
    (none without ``--posthoc-ema``) and their bytes: each holds every tracked EMA in float32,
    and nothing prunes them."""
    from selfflow.train.phema import snapshot_steps

    sigma_rels = getattr(settings, "posthoc_ema", ())
    if not sigma_rels:
        return [], 0
    steps = snapshot_steps(settings.snapshot_every, step, settings.steps)
    each = len(sigma_rels) * num_parameters * 4 + (1 << 20)
    total = len(steps) * each
    line = (
        f"post-hoc EMA σ_rel {', '.join(f'{s:g}' for s in sigma_rels)}: a snapshot of all of "
        f"them every {settings.snapshot_every} steps and at the last, about {each / 1e6:,.1f} MB "
        f"each; {len(steps)} still to write: about {total / 1e9:.2f} GB, kept until you delete "
        f"them (phema/)"
    )
    return [line], total


def plan_lines(
    run: Path,
    settings: Any,
    *,
    step: int,
    images: int,
    num_parameters: int,
    init_from: str | None,
) -> tuple[list[str], list[str]]:
    """What a run would do from ``step``, for ``--dry-run`` (``settings``: the resolved
    ``TrainConfig``): its folder, the size of each checkpoint against the free space, the
    images and epochs left, and what it is initialised from; then the checks that failed
    (too little free space for the checkpoints the finished run keeps)."""
    run = Path(run)
    if step:
        folder = f"resumes at step {step} in {run}"
    elif list_checkpoints(run):
        folder = f"no checkpoint in {run} is intact: the run starts over at step 0"
    elif (run / RUN_FILE).exists():
        folder = f"{run} holds this run's {RUN_FILE} and no checkpoint: starts at step 0"
    else:
        folder = f"a new run in {run} ({RUN_FILE} and {CHECKPOINT_DIR}/ would be written there)"
    seen = (settings.steps - step) * settings.global_batch_size
    to_go = (
        f"{settings.steps - step} steps × {settings.global_batch_size} = {seen:,} images to go, "
        f"{seen / images:.2f} epochs of the dataset's {images:,}"
        if settings.steps > step
        else f"already at step {step} of {settings.steps}: nothing to train (raise --steps)"
    )
    each, kept = state_bytes(num_parameters), kept_checkpoints(settings)
    free = free_bytes(run)
    snapshots, snapshot_total = snapshot_plan(settings, step, num_parameters)
    lines = [
        folder,
        f"each checkpoint with its EMA export: about {each / 1e9:.2f} GB, every "
        f"{settings.checkpoint_every} steps; the finished run keeps {kept} (the newest "
        f"{settings.keep_last}"
        + (f" and every multiple of {settings.keep_every}" if settings.keep_every else "")
        + f"): about {kept * each / 1e9:.1f} GB; {free / 1e9:.1f} GB free there now"
        + ("" if free >= kept * each + snapshot_total else " (not enough for the whole run)"),
        to_go,
        *snapshots,
    ]
    if init_from is not None:
        lines.append(f"starts from the weights of {init_from} (keys and shapes checked)")
    failures = []
    if free < kept * each + snapshot_total:
        failures.append(
            f"not enough free space in {nearest_existing(run)} for the whole run: "
            f"{free / 1e6:,.1f} MB free, its {kept} kept checkpoints with their exports need "
            f"about {kept * each / 1e6:,.1f} MB"
            + (
                f" and its post-hoc EMA snapshots {snapshot_total / 1e6:,.1f} MB"
                if snapshots
                else ""
            )
            + "; free space there, or keep fewer (--keep-last, --keep-every, --checkpoint-every"
            + (", --snapshot-every)" if snapshots else ")")
        )
    return lines, failures
