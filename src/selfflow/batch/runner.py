"""The FID batch: plan, sample, write, resume, assemble — on one process or under torchrun.

:func:`generate_fid_batch` is what ``selfflow sample`` and the root ``sample.py`` run. Its
steps, and who does each:

1. **Set-up (rank 0).** Check the settings and the output folder, lock the folder for this run
   (:mod:`selfflow.batch.lock`; a second run there is refused), load the checkpoint (its
   sha256 identifies it) and the VAE, compare with ``manifest.json`` (refusing a folder made
   with other settings, or clearing it under ``--overwrite``), delete temporaries of killed runs
   and list the shard files already there (a finished run of another N with the same settings
   is reused: :mod:`selfflow.batch.reuse`). A set-up that fails removes the folders it made.
   Every other rank waits for the outcome, so a bad option fails once, with one message,
   before any GPU work. Then every rank checks that it sees a file rank 0 wrote in the folder (:func:`selfflow.distributed.check_shared_folder`).
2. **Verify (all ranks).** Existing shards are read back and checked (CRC, shapes, indices,
   labels); the check is split over the ranks. A shard that fails is deleted and redone.
3. **Sample (all ranks).** Pending shard ``j`` (in plan order) goes to rank ``j % world``. Each
   rank samples its shards' indices in batches of ``--batch-size`` (or N if smaller; a batch
   may span two shards; a short last batch is padded with copies of its last sample, so that
   the network always sees one shape and a sample's bytes never depend on how the work was
   cut) while a background thread decodes, in fixed chunks of ``selfflow.vae.DECODE_BATCH``,
   and writes (see :mod:`selfflow.batch.writer`).
   Rank 0 shows one progress bar for the whole batch: its own images as they are decoded, the
   other ranks' as their shard files appear. The step ends with a barrier that notices a
   process that died (:func:`selfflow.distributed.wait_for_all`), so rank 0 never waits for
   shards that will not come.
4. **Assemble (rank 0)** after a barrier: ``samples_{N}.npz`` streamed shard by shard, then
   ``grid.png`` and the manifest's ``complete`` record; the shards are deleted unless
   ``keep_shards``. With ``eval_ref``, ADM's metrics follow.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from selfflow import distributed
from selfflow.batch import reuse, store
from selfflow.batch.assemble import GRID_SAMPLES, assemble, npz_name
from selfflow.batch.lock import FolderLock
from selfflow.batch.manifest import (
    MANIFEST_NAME,
    SAMPLING_REVISION,
    Manifest,
    differing_settings,
    image_settings,
    read_manifest,
    write_manifest,
)
from selfflow.batch.writer import FiniteWatch, NonFiniteSamplesError, ShardWriter, write_pngs
from selfflow.errors import ConfigurationError, SelfFlowError
from selfflow.npz import iter_npz_rows, npz_array_info

DTYPES = ("float32", "bfloat16")
VAE_DTYPE = "bfloat16"  # the official sampler decodes in bf16 (FACTS §2)
EVALUATOR_MODULE = "selfflow.eval.evaluator"
STEP_PROGRESS_AFTER = 10.0  # seconds into a batch before the bar shows the batch's step count


class ReportedOnRankZero(SelfFlowError):
    """Set-up failed; rank 0 prints the reason, the other ranks only stop.

    (An output folder that not all nodes share is reported by each node's first process, as
    the other nodes' logs are elsewhere.)
    """


@dataclass
class BatchConfig:
    """Every option of ``selfflow sample`` (the official ones first)."""

    checkpoint: str | os.PathLike | None = None
    output_dir: str | os.PathLike = "samples"
    num_samples: int = 50_000
    batch_size: int = 64
    num_steps: int | None = None  # None: the mode's default (SDE 250, ODE 50)
    mode: str = "sde"
    seed: int = 31
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    save_images: bool = False
    solver: str = "heun"
    vae: str | None = None
    class_balanced: bool = False
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    shard_size: int | None = None
    keep_shards: bool = False
    eval_ref: str | os.PathLike | None = None
    inception: str | os.PathLike | None = None

    def validate(self) -> None:
        """Option checks that need no file: fail before anything is loaded."""

        def whole(name: str, value: Any, minimum: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigurationError(f"{name} must be {what}; got {value!r}")

        whole("--num-fid-samples", self.num_samples, 1, "a positive number of images")
        whole("--batch-size", self.batch_size, 1, "a positive number of images per process")
        if self.shard_size is not None:
            whole("--shard-size", self.shard_size, 1, "a positive number of images")
        if not isinstance(self.mode, str) or self.mode.lower() not in ("sde", "ode"):
            raise ConfigurationError(f"--mode must be SDE or ODE (any case); got {self.mode!r}")
        if self.num_steps is None:
            from selfflow.defaults import default_num_steps

            self.num_steps = default_num_steps(self.mode)
        whole("--num-steps", self.num_steps, 2, "at least 2")
        if not isinstance(self.solver, str) or self.solver.lower() not in ("euler", "heun"):
            raise ConfigurationError(f"--solver must be euler or heun; got {self.solver!r}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigurationError(
                f"--cfg-scale must be a finite number >= 0 (1.0 = no guidance); got {self.cfg_scale}"
            )
        for name, value in (
            ("--guidance-low", self.guidance_low),
            ("--guidance-high", self.guidance_high),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"{name} must lie in [0, 1] (a time tau); got {value}")
        if self.guidance_low > self.guidance_high:
            raise ConfigurationError(
                f"--guidance-low ({self.guidance_low}) must not exceed --guidance-high "
                f"({self.guidance_high}): guidance applies while low <= tau <= high"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigurationError(f"--dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.class_balanced:
            from selfflow.seeds import balanced_labels

            balanced_labels(self.seed, self.num_samples)  # raises with the reason
        self.eval_ref = _in_cache_if_bare(self.eval_ref)
        for name, value in (("--eval-ref", self.eval_ref), ("--inception", self.inception)):
            if value is not None and not Path(value).is_file():
                where = " (a directory)" if Path(value).is_dir() else ""
                raise ConfigurationError(
                    f"{name} {value}: no such file{where}"
                    + (_cache_hint(value) if name == "--eval-ref" else "")
                )
        if self.inception is not None and self.eval_ref is None:
            raise ConfigurationError("--inception is only used with --eval-ref")
        if self.eval_ref is not None:
            import importlib.util

            if importlib.util.find_spec(EVALUATOR_MODULE) is None:
                raise ConfigurationError(
                    f"--eval-ref needs the evaluator ({EVALUATOR_MODULE}), which this "
                    f"installation lacks; sample without --eval-ref and run `selfflow evaluate` later"
                )


@dataclass
class BatchResult:
    npz_path: Path
    num_samples: int
    new_samples: int
    seconds: float
    world_size: int
    metrics: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.new_samples == 0:
            return f"{self.num_samples} images already complete in {self.npz_path}"
        return (
            f"{self.num_samples} images ({self.new_samples} sampled now) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s on {self.world_size} "
            f"process{'es' if self.world_size > 1 else ''}; wrote {self.npz_path}"
        )


# ----------------------------------------------------------------------------------------------
# Entry point


def generate_fid_batch(
    config: BatchConfig,
    *,
    context: distributed.DistributedContext | None = None,
    prepare_pipeline: Callable[[Any], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BatchResult | None:
    """Sample, write and assemble the batch; returns the result on rank 0, None elsewhere.

    ``prepare_pipeline(pipe)`` may wrap or instrument the loaded pipeline (tests use it); it
    must not change what the images are.
    """
    own = context is None
    context = context or distributed.setup(config.device)
    job = _Job(config, context, prepare_pipeline, progress, log or _print)
    try:
        return job.run()
    finally:
        if own:
            distributed.teardown(context)


def _print(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# The job


@dataclass
class _SetupOutcome:
    """What rank 0 decides and every rank needs (picklable, broadcast)."""

    checkpoint: str
    manifest_json: dict
    candidates: list[int]  # shard files present before verification
    complete: bool


class _Job:
    def __init__(self, config, context, prepare_pipeline, progress, log) -> None:
        self.config = config
        self.context = context
        self.prepare_pipeline = prepare_pipeline
        self.progress = progress and context.is_main
        self.log = log if context.is_main else (lambda message: None)
        self.output_dir = Path(config.output_dir).expanduser()
        self.dtype_name = config.dtype or (
            "bfloat16" if context.device.type == "cuda" else "float32"
        )
        self.pipe = None
        self.network = ""
        self.manifest: Manifest | None = None
        self.plan: store.ShardPlan | None = None
        self._balanced: np.ndarray | None = None
        self.lock = FolderLock(self.output_dir)  # taken by rank 0 in the set-up

    # -- orchestration ------------------------------------------------------------------------

    def run(self) -> BatchResult | None:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> BatchResult | None:
        started = time.perf_counter()
        outcome = self._agreed_setup()
        try:
            distributed.check_shared_folder(self.context, self.output_dir)
        except ConfigurationError as error:
            if self.context.local_rank == 0:
                raise
            raise ReportedOnRankZero(str(error)) from error
        self.manifest = Manifest.from_json(outcome.manifest_json, self.output_dir / MANIFEST_NAME)
        self.plan = store.ShardPlan(self.config.num_samples, self.manifest.shard_size)
        if outcome.complete:
            return self._already_complete(started) if self.context.is_main else None
        if self.pipe is None:
            self.pipe = self._load_pipeline(outcome.checkpoint)[0]
        pending = self._verify(outcome.candidates)
        mine = distributed.assign(pending, self.context.rank, self.context.world_size)
        done_before = self.config.num_samples - sum(self.plan.shard(k).size for k in pending)
        self.log(
            f"selfflow sample: {self.config.num_samples} images in {self.plan.num_shards} shards "
            f"of {self.plan.shard_size}; {done_before} done, {len(pending)} shards to sample on "
            f"{self.context.world_size} process(es) ({self.context.device}, {self.network}, "
            f"batch {self.config.batch_size} per process)"
        )
        sampling_started = time.perf_counter()
        self._sample(pending, mine, done_before)  # ends when every process has finished
        seconds = time.perf_counter() - sampling_started
        if not self.context.is_main:
            return None
        new = self.config.num_samples - done_before
        npz_path = self._assemble()
        result = BatchResult(
            npz_path, self.config.num_samples, new, seconds, self.context.world_size
        )
        self._evaluate(result)
        return result

    def _agreed_setup(self) -> _SetupOutcome:
        """Rank 0 decides; the others learn the decision or that it failed."""
        if not self.context.is_main:
            outcome = distributed.broadcast_object(self.context, None)
            if isinstance(outcome, str):
                raise ReportedOnRankZero(outcome)
            return outcome
        try:
            outcome = self._setup()
        except BaseException as error:
            distributed.broadcast_object(self.context, f"rank 0 stopped: {error}")
            raise
        return distributed.broadcast_object(self.context, outcome)

    # -- step 1: set-up on rank 0 -------------------------------------------------------------

    def _setup(self) -> _SetupOutcome:
        created = _first_missing(self.output_dir)
        try:
            return self._setup_in_folder()
        except BaseException:
            if created is not None:  # a set-up that failed leaves no empty folders behind
                self.lock.release()
                _remove_empty_folders(self.output_dir, created)
            raise

    def _setup_in_folder(self) -> _SetupOutcome:
        config = self.config
        config.validate()
        if config.eval_ref is not None and config.inception is None:
            # before hours of sampling: the evaluation's graph must be here or downloadable
            from selfflow.download import inception_path

            config.inception = str(inception_path())
        _prepare_output_dir(self.output_dir)
        self.lock.acquire()  # before anything in the folder is read or deleted
        for stale in self.output_dir.glob(f"{distributed.SHARED_CHECK_PREFIX}*"):
            stale.unlink(missing_ok=True)  # a killed run's check file
        existing = None if config.overwrite else read_manifest(self.output_dir)
        if not config.overwrite and existing is None and _any_shard_files(self.output_dir):
            raise ConfigurationError(
                f"{self.output_dir} holds shard files but no {MANIFEST_NAME}, so their settings "
                f"are unknown; use --overwrite to start over or choose another --output-dir"
            )
        checkpoint = str(config.checkpoint) if config.checkpoint is not None else None
        self.pipe, checkpoint = self._load_pipeline(checkpoint)
        # Only now, with the checkpoint and the VAE known to load, may --overwrite delete a run.
        if config.overwrite:
            removed = clear_output_dir(self.output_dir)
            if removed:
                self.log(
                    f"--overwrite: removed {removed} files of the previous run in {self.output_dir}"
                )
        import selfflow
        from selfflow.download import verification
        from selfflow.files import file_sha256

        checkpoint_sha256 = file_sha256(checkpoint)
        settings = image_settings(
            checkpoint_sha256=checkpoint_sha256,
            vae=vae_identity(config.vae),
            num_samples=config.num_samples,
            num_steps=config.num_steps,
            mode=config.mode,
            solver=config.solver,
            seed=config.seed,
            cfg_scale=config.cfg_scale,
            guidance_low=config.guidance_low,
            guidance_high=config.guidance_high,
            class_balanced=config.class_balanced,
            dtype=self.dtype_name,
            network=self.network,
            vae_dtype=VAE_DTYPE,
        )
        image_shape = self._image_shape()
        run_info = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "world_size": self.context.world_size,
            "device": str(self.context.device),
            "selfflow_version": selfflow.__version__,
            "batch_size": config.batch_size,
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
        complete = False
        reused_from: tuple[Path, int] | None = None
        if existing is not None:
            differences = differing_settings(existing.settings, settings)
            if differences and reuse.only_the_count_differs(existing.settings, settings):
                # a finished run of another size: its samples are those of this run (or refused)
                reused_from = reuse.finished_npz(
                    self.output_dir, existing.settings, existing.complete
                )
            elif differences:
                hint = "use the same settings to resume"
                if existing.settings.get("sampling_revision") != SAMPLING_REVISION:
                    made_by = existing.info.get("selfflow_version", "an older version")
                    hint = (
                        f"this selfflow computes images differently from the one that began the "
                        f"folder (selfflow {made_by}); finish it with that version"
                    )
                raise ConfigurationError(
                    f"{self.output_dir} was sampled with other settings ("
                    + "; ".join(differences)
                    + f"); {hint}, --overwrite to start over, or another --output-dir"
                )
        if existing is not None and reused_from is None:
            if config.shard_size is not None and config.shard_size != existing.shard_size:
                raise ConfigurationError(
                    f"{self.output_dir} is planned in shards of {existing.shard_size} images; "
                    f"--shard-size {config.shard_size} differs (leave it out to resume)"
                )
            manifest = existing
            runs = manifest.info.setdefault("runs", [])
            self._note_other_batch_size(runs, config.batch_size)
            runs.append(run_info)
            complete = self._check_complete(manifest)
            if not complete and manifest.complete is not None:
                self.log(
                    f"the npz recorded in {MANIFEST_NAME} is missing or damaged; rebuilding it"
                )
                manifest.complete = None
        else:
            manifest = Manifest(
                settings=settings,
                shard_size=config.shard_size or store.default_shard_size(config.num_samples),
                image_shape=image_shape,
                info={
                    "checkpoint": str(Path(checkpoint).resolve()),
                    "vae": config.vae or _default_vae(),
                    "selfflow_version": selfflow.__version__,
                    "torch": _torch_version(),
                    "created": run_info["started"],
                    "runs": [run_info],
                },
            )
            if reused_from is not None:
                manifest.info["runs"] = [*existing.info.get("runs", []), run_info]
                manifest.info["reused"] = {"npz": reused_from[0].name, "samples": reused_from[1]}
        if tuple(manifest.image_shape) != image_shape:
            raise ConfigurationError(
                f"{self.output_dir} holds {manifest.image_shape} images but this VAE makes {image_shape}"
            )
        removed = store.remove_temporaries(
            [self.output_dir, self.output_dir / store.SHARD_DIR, self.output_dir / store.IMAGE_DIR]
        )
        if removed:
            self.log(f"removed {removed} temporary files left by an interrupted run")
        plan = store.ShardPlan(config.num_samples, manifest.shard_size)
        if reused_from is not None:  # before the manifest changes: a kill here cuts them again
            reused = reuse.shards_from_npz(self.output_dir, plan, *reused_from)
            self.log(
                f"reusing {reused} samples of {reused_from[0].name} (same settings, sample i "
                f"depends only on the seed and i); {config.num_samples - reused} to sample"
            )
        write_manifest(self.output_dir, manifest)
        candidates = [shard.id for shard in store.existing_shards(self.output_dir, plan)]
        return _SetupOutcome(checkpoint, manifest.to_json(), candidates, complete)

    def _load_pipeline(self, checkpoint: str | None):
        """Model, VAE and the network path for ``--dtype``; returns ``(pipe, checkpoint path)``."""
        import torch

        from selfflow.checkpoint import download_checkpoint
        from selfflow.pipeline import SelfFlowPipeline

        device = self.context.device
        # No --ckpt: rank 0 downloads the released file (or finds it in the cache) and passes its
        # path on; a process on another node without that path fetches it into its own cache.
        if checkpoint is None or (self.config.checkpoint is None and not Path(checkpoint).exists()):
            checkpoint = str(download_checkpoint())
        pipe = SelfFlowPipeline.from_pretrained(
            checkpoint,
            self.config.vae or _default_vae(),
            device=device,
            dtype=getattr(torch, self.dtype_name),
        )
        self.network = f"{type(pipe.model_fn).__name__}/{self.dtype_name}"
        if self.prepare_pipeline is not None:
            self.prepare_pipeline(pipe)
        return pipe, checkpoint

    def _note_other_batch_size(self, runs: list[dict], batch_size: int) -> None:
        """Say so when a resume changes ``--batch-size``.

        The images stay those of the same noise and labels, but kernels are chosen per batch
        shape and round differently: measured on an H200 (random weights, bf16), two batch sizes
        differ in about half the bytes by a level or so, as much as bf16 differs from float32;
        in float32 on a CPU the network's last bits change, which the bf16 VAE turns into a
        level here and there. Same distribution, so the FID is unaffected; byte-identical
        results need one ``--batch-size`` (the GPU count does not matter).
        """
        shape = batch_shape(self.config.num_samples, batch_size)
        earlier = sorted(
            {
                run["batch_size"]
                for run in runs
                if "batch_size" in run
                and batch_shape(self.config.num_samples, run["batch_size"]) != shape
            }
        )
        if earlier:
            self.log(
                f"note: this folder was begun with --batch-size {', '.join(map(str, earlier))}; "
                f"in {self.dtype_name} the images sampled now at --batch-size {batch_size} differ "
                f"from those of one uninterrupted run by rounding only (same noise, same "
                f"distribution); keep one --batch-size for byte-identical results"
            )

    def _image_shape(self) -> tuple[int, int, int]:
        """Decode one zero latent: the VAE, not a constant, says how large the images are."""
        import torch

        zero = torch.zeros((1, *self.pipe.latent_shape), device=self.context.device)
        return tuple(int(n) for n in self.pipe.decode(zero).shape[1:])  # type: ignore[return-value]

    def _check_complete(self, manifest: Manifest) -> bool:
        record = manifest.complete
        if not record:
            return False
        path = self.output_dir / npz_name(self.config.num_samples)
        try:
            info = npz_array_info(path)
            if not (
                path.stat().st_size == record.get("bytes")
                and info.shape == (self.config.num_samples, *manifest.image_shape)
                and info.dtype == np.uint8
            ):
                return False
        except Exception:  # unreadable in any way: not complete
            return False
        if not record.get("sha256"):  # written by a version that did not record it
            return True
        from selfflow.files import file_sha256

        self.log(f"checking {path.name} against the sha256 recorded in {MANIFEST_NAME}")
        return file_sha256(path) == record["sha256"]

    # -- step 2: verify -----------------------------------------------------------------------

    def _labels(self, indices: np.ndarray) -> np.ndarray:
        from selfflow import seeds

        if self.config.class_balanced:
            if self._balanced is None:
                self._balanced = seeds.balanced_labels(self.config.seed, self.config.num_samples)
            return self._balanced[indices]
        return seeds.uniform_labels(self.config.seed, indices.tolist()).numpy()

    def _verify(self, candidates: list[int]) -> list[int]:
        """Check the shard files present; returns the ids still to sample (in plan order)."""
        plan = self.plan
        bad: list[tuple[int, str]] = []
        for shard_id in distributed.assign(candidates, self.context.rank, self.context.world_size):
            shard = plan.shard(shard_id)
            path = store.shard_path(self.output_dir, shard)
            try:
                images, _ = store.read_shard(
                    path, shard, self.manifest.image_shape, self._labels(shard.indices)
                )
            except store.ShardError as error:
                bad.append((shard_id, str(error)))
                path.unlink(missing_ok=True)
                continue
            if self.config.save_images:
                write_pngs(
                    self.output_dir, images, shard.indices, plan.num_samples, only_missing=True
                )
        all_bad = [
            item for part in distributed.all_gather_objects(self.context, bad) for item in part
        ]
        for shard_id, reason in sorted(all_bad):
            shard = plan.shard(shard_id)
            self.log(
                f"shard {shard_id} (samples {shard.start}…{shard.stop - 1}) is redone: {reason}"
            )
        done = set(candidates) - {shard_id for shard_id, _ in all_bad}
        return [shard.id for shard in plan.shards if shard.id not in done]

    # -- step 3: sample -----------------------------------------------------------------------

    def _sample(self, pending: list[int], mine: list[int], done_before: int) -> None:
        import torch

        from selfflow.pipeline import SamplerSettings

        config, plan, pipe = self.config, self.plan, self.pipe
        settings = SamplerSettings(
            config.num_steps,
            config.mode,
            config.solver,
            config.cfg_scale,
            (config.guidance_low, config.guidance_high),
        )
        shards = [plan.shard(k) for k in mine]
        indices_all = (
            np.concatenate([shard.indices for shard in shards]) if shards else np.zeros(0, np.int64)
        )
        batch = batch_shape(plan.num_samples, config.batch_size)
        if len(indices_all) and getattr(pipe.model_fn, "compiled", False):
            # before the bar appears: it would stand at 0 for the whole compilation
            guided = f" (and {2 * batch} where guided)" if config.cfg_scale != 1.0 else ""
            self.log(
                f"compiling the network for batch {batch}{guided}: about a minute on first use"
            )
        if config.save_images:
            (self.output_dir / store.IMAGE_DIR).mkdir(exist_ok=True)
        bar = _Progress(self, pending, set(mine), done_before)
        writer = ShardWriter(
            pipe.decode,
            self.output_dir,
            shards,
            tuple(self.manifest.image_shape),
            plan.num_samples,
            save_images=config.save_images,
            on_images=bar.add_own,
        ).start()
        watch = FiniteWatch(pipe.model_fn)
        pipe.model_fn = watch
        try:
            for start in range(0, len(indices_all), config.batch_size):
                indices = indices_all[start : start + config.batch_size]
                real = len(indices)
                padded = pad_batch(indices, batch)
                labels = self._labels(padded)
                watch.reset(len(padded), pipe.device)
                bar.start_batch()
                try:
                    latents = pipe.sample_latents(
                        torch.from_numpy(labels),
                        padded.tolist(),
                        config.seed,
                        settings,
                        progress=bar.on_step,
                    )
                except SelfFlowError as error:
                    rows = [row for row in watch.bad_rows() if row < real]
                    if rows:
                        raise NonFiniteSamplesError(indices[rows], "sampling") from error
                    raise
                # the padding rows (copies of the last sample) never reach the writer
                writer.submit(indices, labels[:real], latents[:real])
                del latents
                bar.poll()
            writer.finish()
            try:
                distributed.wait_for_all(self.context, while_waiting=bar.poll)
            except distributed.PeerLostError as error:
                if not self.context.is_main:
                    raise
                raise distributed.PeerLostError(
                    f"{error}. {bar.describe_missing()}. The shards written so far are kept: "
                    f"run the same command again to continue"
                ) from error
            bar.wait_for_others()
        except BaseException:
            writer.abort()
            raise
        finally:
            pipe.model_fn = watch.model_fn
            bar.close()

    # -- step 4: assemble, evaluate -----------------------------------------------------------

    def _assemble(self) -> Path:
        from selfflow.images import save_grid

        plan, manifest = self.plan, self.manifest
        bar = _bar(self.progress, plan.num_samples, "assembling")
        try:
            npz_path, first = assemble(
                self.output_dir,
                plan,
                tuple(manifest.image_shape),
                expected_labels=self._labels,
                on_shard=bar.update if bar else None,
            )
        except store.ShardError as error:
            raise ConfigurationError(
                f"cannot assemble {npz_name(plan.num_samples)}: {error}"
            ) from error
        finally:
            if bar:
                bar.close()
        save_grid(first[:GRID_SAMPLES], self.output_dir / "grid.png", columns=8)
        from selfflow.files import file_sha256

        manifest.complete = {
            "npz": npz_path.name,
            "bytes": npz_path.stat().st_size,
            "sha256": file_sha256(npz_path),  # a rerun re-checks it before "already complete"
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(self.output_dir, manifest)
        if not self.config.keep_shards:
            shutil.rmtree(self.output_dir / store.SHARD_DIR, ignore_errors=True)
        return npz_path

    def _already_complete(self, started: float) -> BatchResult:
        npz_path = self.output_dir / npz_name(self.config.num_samples)
        self.log(f"{npz_path} is already complete for these settings; nothing to sample")
        if self.config.save_images:
            written, start = 0, 0
            for block in iter_npz_rows(npz_path, "arr_0", rows_per_block=256):
                indices = np.arange(start, start + len(block))
                written += write_pngs(
                    self.output_dir, block, indices, self.config.num_samples, only_missing=True
                )
                start += len(block)
            if written:
                self.log(f"wrote {written} missing PNGs from {npz_path.name}")
        if not (self.output_dir / "grid.png").exists():
            from selfflow.images import save_grid

            first = next(iter_npz_rows(npz_path, "arr_0", rows_per_block=GRID_SAMPLES))
            save_grid(first, self.output_dir / "grid.png", columns=8)
        result = BatchResult(
            npz_path,
            self.config.num_samples,
            0,
            time.perf_counter() - started,
            self.context.world_size,
        )
        self._evaluate(result)
        return result

    def _evaluate(self, result: BatchResult) -> None:
        if self.config.eval_ref is None:
            return
        import importlib

        if self.pipe is not None:  # free the sampler's memory for the Inception network
            self.pipe = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        evaluator = importlib.import_module(EVALUATOR_MODULE)
        self.log(f"evaluating {result.npz_path} against {self.config.eval_ref}")
        result.metrics = evaluator.evaluate(
            str(self.config.eval_ref),
            str(result.npz_path),
            out_dir=str(self.output_dir),
            inception=str(self.config.inception) if self.config.inception else None,
            device=self.context.device,
        )
        print(evaluator.format_report(result.metrics), flush=True)


# ----------------------------------------------------------------------------------------------
# Progress over the whole batch (rank 0)


class _Progress:
    """One bar over all N images: this rank's as decoded, the others' as their shards land."""

    def __init__(self, job: _Job, pending: list[int], mine: set[int], done_before: int) -> None:
        self.job = job
        self.enabled = job.context.is_main
        self.others = {k for k in pending if k not in mine} if self.enabled else set()
        world = job.context.world_size
        self.owner = {k: j % world for j, k in enumerate(pending)}  # as distributed.assign
        self._own = 0
        self._shown = 0
        self._batch_started = time.monotonic()
        self._step_shown: float | None = None
        self._lock = threading.Lock()
        self.bar = _bar(job.progress, job.plan.num_samples, "sampling", initial=done_before)

    def start_batch(self) -> None:
        self._batch_started = time.monotonic()
        self._step_shown = None

    def on_step(self, done: int, total: int) -> None:
        """The step counter of the batch being sampled, once a batch takes long.

        The bar counts images as they are decoded, so with XL/2 on a CPU, or large batches,
        it stands still for minutes; after ``STEP_PROGRESS_AFTER`` seconds into a batch its
        step count is shown next to the bar (at most twice a second).
        """
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self._batch_started < STEP_PROGRESS_AFTER:
            return
        if self._step_shown is None or now - self._step_shown >= 0.5 or done == total:
            self._step_shown = now
            self.bar.set_postfix_str(f"batch at step {done}/{total}")

    def add_own(self, count: int) -> None:
        with self._lock:
            self._own += count

    def poll(self) -> None:
        if not self.enabled:
            return
        if self.others:
            landed = {s.id for s in store.existing_shards(self.job.output_dir, self.job.plan)}
            arrived = self.others & landed
            self.others -= arrived
            with self._lock:
                self._own += sum(self.job.plan.shard(k).size for k in arrived)
        with self._lock:
            delta, self._shown = self._own - self._shown, self._own
        if self.bar is not None and delta:
            self.bar.update(delta)

    def describe_missing(self) -> str:
        self.poll()
        if not self.others:
            return "every shard was written"
        by_rank: dict[int, list[int]] = {}
        for shard_id in sorted(self.others):
            by_rank.setdefault(self.owner[shard_id], []).append(shard_id)
        return "; ".join(
            f"rank {rank} did not write shards {', '.join(map(str, ids))}"
            for rank, ids in sorted(by_rank.items())
        )

    def wait_for_others(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """After every process has finished: wait until their shard files are visible here.

        On a network filesystem a file written on another node may take a moment to appear
        in a listing on this one; far longer means the folder is not what the others wrote to.
        """
        deadline = time.monotonic() + timeout
        self.poll()
        while self.others:
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"every process finished, but after {timeout:.0f} s {self.job.output_dir} "
                    f"still lacks their shards ({self.describe_missing()}); --output-dir must be "
                    f"on a filesystem all nodes share"
                )
            time.sleep(interval)
            self.poll()

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()


def _bar(enabled: bool, total: int, desc: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="img", smoothing=0.05, dynamic_ncols=True
    )


# ----------------------------------------------------------------------------------------------
# Helpers


def batch_shape(num_samples: int, batch_size: int) -> int:
    """The one batch size every process samples with: ``--batch-size``, or N if smaller.

    It depends on the run's settings alone, never on a process's share of the work: kernels
    round differently per batch shape (bf16 and float32 alike), and at one shape a row's result
    does not depend on its neighbours, so one shape everywhere makes a sample's bytes the same
    on any GPU count, in a short last batch and in a resume that redoes a few shards. (The
    compiled fast path also compiles again, about a minute for XL/2, for every new shape.)
    """
    return max(1, min(batch_size, num_samples))


def pad_batch(indices: np.ndarray, size: int) -> np.ndarray:
    """``indices`` followed by copies of its last index, ``size`` in all.

    The noise of a sample is keyed by its index alone, so the padding rows are copies of the
    last sample and the real rows are what they would be in a batch of their own.
    """
    if len(indices) >= size:
        return indices
    return np.concatenate([indices, np.full(size - len(indices), indices[-1], indices.dtype)])


def _prepare_output_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigurationError(
            f"--output-dir {path} is a file; expected a folder (created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create --output-dir {path}: {error.strerror or error}"
        ) from error
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise ConfigurationError(
            f"--output-dir {path} is not writable: {error.strerror or error}"
        ) from error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, if any."""
    missing = None
    for folder in [path, *path.absolute().parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_empty_folders(path: Path, up_to: Path) -> None:
    """Remove ``path`` and its parents up to ``up_to`` while they are empty (never anything else)."""
    for leftover in path.glob(f"{distributed.SHARED_CHECK_PREFIX}*") if path.is_dir() else []:
        leftover.unlink(missing_ok=True)
    for folder in [path.absolute(), *path.absolute().parents]:
        try:
            folder.rmdir()  # fails on a folder that holds anything
        except OSError:
            return
        if folder == up_to.absolute():
            return


def _any_shard_files(output_dir: Path) -> list[str]:
    folder = output_dir / store.SHARD_DIR
    if not folder.is_dir():
        return []
    return [
        e.name
        for e in os.scandir(folder)
        if e.name.startswith("shard_") and e.name.endswith(".npz")
    ]


def clear_output_dir(output_dir: Path) -> int:
    """Delete what a previous run wrote (and only that): manifest, shards, npz, grid, PNGs."""
    removed = 0
    candidates = [output_dir / MANIFEST_NAME, output_dir / "grid.png", output_dir / "metrics.json"]
    candidates += list(output_dir.glob("samples_*.npz"))
    for folder, pattern in ((store.SHARD_DIR, "*.npz"), (store.IMAGE_DIR, "*.png")):
        if (output_dir / folder).is_dir():
            candidates += [
                p
                for p in (output_dir / folder).glob(pattern)
                if p.stem.removeprefix("shard_").isdigit()
            ]
    for path in candidates:
        if path.is_file():
            path.unlink()
            removed += 1
    removed += store.remove_temporaries([output_dir, output_dir / store.SHARD_DIR])
    return removed


def vae_identity(vae: str | None) -> str:
    """A hub id as given; a local folder by the sha256 of its files (its path may move)."""
    name = vae or _default_vae()
    folder = Path(name).expanduser()
    if not folder.exists():
        return name
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return f"local folder sha256:{digest.hexdigest()}"


def _in_cache_if_bare(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """A bare file name that is not in the working folder, found in selfflow's cache instead.

    ``selfflow download reference`` puts ADM's reference batch there, so the official command
    line ``--eval-ref VIRTUAL_imagenet256_labeled.npz`` works from any folder.
    """
    if path is None or Path(path).exists() or Path(path).name != str(path):
        return path
    from selfflow.download import cache_dir

    cached = cache_dir() / str(path)
    return str(cached) if cached.is_file() else path


def _cache_hint(path: str | os.PathLike) -> str:
    if Path(path).name != str(path):
        return ""
    from selfflow.download import cache_dir

    return f", neither here nor in {cache_dir()} (`selfflow download reference` puts it there)"


def _default_vae() -> str:
    from selfflow.vae import SD_VAE_ID

    return SD_VAE_ID


def _torch_version() -> str:
    import torch

    return torch.__version__
