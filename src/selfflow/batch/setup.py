"""Step 1 of the FID batch: rank 0 sets up, every rank learns the outcome.

Rank 0 checks the settings and the output folder, locks the folder, loads the checkpoint (its
sha256 identifies it) and the VAE, compares with ``manifest.json`` (refusing a folder made with
other settings, or clearing it under ``--overwrite``), deletes temporaries of killed runs and
lists the shard files already there (a finished run of another N with the same settings is
reused). A set-up that fails removes the folders it made; the other ranks receive either the
outcome or the failure, so a bad option fails once, with one message, before any GPU work.

``job`` is the running batch (:class:`selfflow.batch.runner.BatchJob`): its config, context,
folder lock, log, and the pipeline the set-up loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.base import distributed, version
from selfflow.base.download import verification
from selfflow.base.errors import ConfigurationError, ReportedOnRankZero
from selfflow.base.files import file_sha256, remove_temporaries
from selfflow.base.npz import npz_array_info
from selfflow.batch import reuse, store
from selfflow.batch.assemble import npz_name
from selfflow.batch.config import batch_shape
from selfflow.batch.folder import (
    any_shard_files,
    clear_output_dir,
    first_missing,
    prepare_output_dir,
    remove_empty_folders,
    torch_version,
    vae_identity,
)
from selfflow.batch.manifest import (
    MANIFEST_NAME,
    SAMPLING_REVISION,
    Manifest,
    differing_settings,
    image_settings,
    read_manifest,
    write_manifest,
)


@dataclass
class SetupOutcome:
    """What rank 0 decides and every rank needs (picklable, broadcast)."""

    checkpoint: str
    manifest_json: dict
    candidates: list[int]  # shard files present before verification
    complete: bool


def agreed_setup(job: Any) -> SetupOutcome:
    """Rank 0 decides; the others learn the decision or that it failed."""
    if not job.context.is_main:
        outcome = distributed.broadcast_object(job.context, None)
        if isinstance(outcome, str):
            raise ReportedOnRankZero(outcome)
        return outcome
    try:
        outcome = _setup(job)
    except BaseException as error:
        distributed.broadcast_object(job.context, f"rank 0 stopped: {error}")
        raise
    return distributed.broadcast_object(job.context, outcome)


def _setup(job: Any) -> SetupOutcome:
    created = first_missing(job.output_dir)
    try:
        return _setup_in_folder(job)
    except BaseException:
        if created is not None:  # a set-up that failed leaves no empty folders behind
            job.lock.release()
            remove_empty_folders(job.output_dir, created)
        raise


def _setup_in_folder(job: Any) -> SetupOutcome:
    existing = _open_folder(job)
    checkpoint = _load_then_clear(job)
    checkpoint_sha256 = file_sha256(checkpoint)
    settings = _image_settings(job, checkpoint_sha256)
    image_shape = _image_shape(job)
    run_info = _run_info(job, checkpoint, checkpoint_sha256)
    reused_from = _reusable_npz(job, existing, settings)
    if existing is not None and reused_from is None:
        manifest, complete = _resumed_manifest(job, existing, run_info)
    else:
        manifest, complete = _new_manifest(job, settings, image_shape, run_info, checkpoint), False
        if reused_from is not None:
            manifest.info["runs"] = [*existing.info.get("runs", []), run_info]
            manifest.info["reused"] = {"npz": reused_from[0].name, "samples": reused_from[1]}
    if tuple(manifest.image_shape) != image_shape:
        raise ConfigurationError(
            f"{job.output_dir} holds {manifest.image_shape} images but this VAE makes {image_shape}"
        )
    removed = remove_temporaries(
        [job.output_dir, job.output_dir / store.SHARD_DIR, job.output_dir / store.IMAGE_DIR]
    )
    if removed:
        job.log(f"removed {removed} temporary files left by an interrupted run")
    plan = store.ShardPlan(job.config.num_samples, manifest.shard_size)
    if reused_from is not None:  # before the manifest changes: a kill here cuts them again
        reused = reuse.shards_from_npz(job.output_dir, plan, *reused_from)
        job.log(
            f"reusing {reused} samples of {reused_from[0].name} (same settings, sample i "
            f"depends only on the seed and i); {job.config.num_samples - reused} to sample"
        )
    write_manifest(job.output_dir, manifest)
    candidates = [shard.id for shard in store.existing_shards(job.output_dir, plan)]
    return SetupOutcome(checkpoint, manifest.to_json(), candidates, complete)


def _open_folder(job: Any) -> Manifest | None:
    """Check the options, lock the folder and read its manifest (None: a new or overwritten run)."""
    config = job.config
    config.validate()
    if config.eval_ref is not None and config.inception is None:
        # before hours of sampling: the evaluation's graph must be here or downloadable
        from selfflow.base.download import inception_path

        config.inception = str(inception_path())
    prepare_output_dir(job.output_dir)
    job.lock.acquire()  # before anything in the folder is read or deleted
    for stale in job.output_dir.glob(f"{distributed.SHARED_CHECK_PREFIX}*"):
        stale.unlink(missing_ok=True)  # a killed run's check file
    existing = None if config.overwrite else read_manifest(job.output_dir)
    if not config.overwrite and existing is None and any_shard_files(job.output_dir):
        raise ConfigurationError(
            f"{job.output_dir} holds shard files but no {MANIFEST_NAME}, so their settings "
            f"are unknown; use --overwrite to start over or choose another --output-dir"
        )
    return existing


def _load_then_clear(job: Any) -> str:
    """Load the pipeline; only then, with checkpoint and VAE known to load, may --overwrite clear."""
    config = job.config
    checkpoint = str(config.checkpoint) if config.checkpoint is not None else None
    job.pipe, checkpoint = job.load_pipeline(checkpoint)
    if config.overwrite:
        removed = clear_output_dir(job.output_dir)
        if removed:
            job.log(f"--overwrite: removed {removed} files of the previous run in {job.output_dir}")
    return checkpoint


def _image_settings(job: Any, checkpoint_sha256: str) -> dict:
    """Every setting an image's bytes depend on (the manifest compares them on a resume)."""
    config = job.config
    return image_settings(
        checkpoint_sha256=checkpoint_sha256,
        vae=vae_identity(job.vae_name),
        num_samples=config.num_samples,
        num_steps=config.num_steps,
        mode=config.mode,
        solver=config.solver,
        seed=config.seed,
        cfg_scale=config.cfg_scale,
        guidance_low=config.guidance_low,
        guidance_high=config.guidance_high,
        class_balanced=config.class_balanced,
        num_classes=job.num_classes,
        dtype=job.dtype_name,
        network=job.network,
        vae_dtype=job.vae_dtype,  # what the loaded VAE runs in, read from its weights
    )


def _run_info(job: Any, checkpoint: str, checkpoint_sha256: str) -> dict:
    """This run's record in the manifest; refuses a checkpoint whose sha256 is known to be wrong."""
    run_info = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": job.context.world_size,
        "device": str(job.context.device),
        "selfflow_version": version.__version__,
        "batch_size": job.config.batch_size,
        "command": " ".join(sys.argv),
        "checkpoint_integrity": verification(checkpoint, checkpoint_sha256),
    }
    if not run_info["checkpoint_integrity"]["verified"] and "DIFFERS" in str(
        run_info["checkpoint_integrity"]["how"]
    ):
        raise ConfigurationError(
            f"{checkpoint}: its sha256 {checkpoint_sha256} "
            f"{run_info['checkpoint_integrity']['how']}; delete it and download it again"
        )
    return run_info


def _reusable_npz(job: Any, existing: Manifest | None, settings: dict) -> tuple[Path, int] | None:
    """A finished run of another N with these settings (its samples are this run's), or None.

    Any other difference from the folder's settings is refused with the list of differences.
    """
    if existing is None:
        return None
    differences = differing_settings(existing.settings, settings)
    if not differences:
        return None
    if reuse.only_the_count_differs(existing.settings, settings):
        return reuse.finished_npz(job.output_dir, existing.settings, existing.complete)
    hint = "use the same settings to resume"
    if existing.settings.get("sampling_revision") != SAMPLING_REVISION:
        made_by = existing.info.get("selfflow_version", "an older version")
        hint = (
            f"this selfflow computes images differently from the one that began the "
            f"folder (selfflow {made_by}); finish it with that version"
        )
    raise ConfigurationError(
        f"{job.output_dir} was sampled with other settings ("
        + "; ".join(differences)
        + f"); {hint}, --overwrite to start over, or another --output-dir"
    )


def _resumed_manifest(job: Any, existing: Manifest, run_info: dict) -> tuple[Manifest, bool]:
    """The folder's manifest with this run added, and whether its npz is already complete."""
    config = job.config
    if config.shard_size is not None and config.shard_size != existing.shard_size:
        raise ConfigurationError(
            f"{job.output_dir} is planned in shards of {existing.shard_size} images; "
            f"--shard-size {config.shard_size} differs (leave it out to resume)"
        )
    runs = existing.info.setdefault("runs", [])
    _note_other_batch_size(job, runs, config.batch_size)
    runs.append(run_info)
    complete = _check_complete(job, existing)
    if not complete and existing.complete is not None:
        job.log(f"the npz recorded in {MANIFEST_NAME} is missing or damaged; rebuilding it")
        existing.complete = None
    return existing, complete


def _new_manifest(
    job: Any, settings: dict, image_shape: tuple, run_info: dict, checkpoint: str
) -> Manifest:
    config = job.config
    return Manifest(
        settings=settings,
        shard_size=config.shard_size or store.default_shard_size(config.num_samples),
        image_shape=image_shape,
        info={
            "checkpoint": str(Path(checkpoint).resolve()),
            "vae": job.vae_name,
            "selfflow_version": version.__version__,
            "torch": torch_version(),
            "created": run_info["started"],
            "runs": [run_info],
        },
    )


def _note_other_batch_size(job: Any, runs: list[dict], batch_size: int) -> None:
    """Say so when a resume changes ``--batch-size``.

    The images keep their noise and labels, but kernels are chosen per batch shape and round
    differently, so bytes change by rounding only (docs/sampling.md's "What is byte-identical"
    gives the measured sizes). Byte-identical results need one ``--batch-size``; the GPU count does
    not matter.
    """
    shape = batch_shape(job.config.num_samples, batch_size)
    earlier = sorted(
        {
            run["batch_size"]
            for run in runs
            if "batch_size" in run
            and batch_shape(job.config.num_samples, run["batch_size"]) != shape
        }
    )
    if earlier:
        job.log(
            f"note: this folder was begun with --batch-size {', '.join(map(str, earlier))}; "
            f"in {job.dtype_name} the images sampled now at --batch-size {batch_size} differ "
            f"from those of one uninterrupted run by rounding only (same noise, same "
            f"distribution); keep one --batch-size for byte-identical results"
        )


def _image_shape(job: Any) -> tuple[int, int, int]:
    """Decode one zero latent: the VAE, not a constant, says how large the images are."""
    import torch

    zero = torch.zeros((1, *job.pipe.latent_shape), device=job.context.device)
    return tuple(int(n) for n in job.pipe.decode(zero).shape[1:])  # type: ignore[return-value]


def _check_complete(job: Any, manifest: Manifest) -> bool:
    record = manifest.complete
    if not record:
        return False
    path = job.output_dir / npz_name(job.config.num_samples)
    try:
        info = npz_array_info(path)
        if not (
            path.stat().st_size == record.get("bytes")
            and info.shape == (job.config.num_samples, *manifest.image_shape)
            and info.dtype == np.uint8
        ):
            return False
    except Exception:  # unreadable in any way: not complete
        return False
    if not record.get("sha256"):  # written by a version that did not record it
        return True
    from selfflow.base.files import file_sha256

    job.log(f"checking {path.name} against the sha256 recorded in {MANIFEST_NAME}")
    return file_sha256(path) == record["sha256"]
