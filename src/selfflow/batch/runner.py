"""The FID batch: plan, sample, write, resume, assemble — on one process or under torchrun.

:func:`generate_fid_batch` is what ``selfflow sample`` and the root ``sample.py`` run, and
what Python code calls to sample N images from a checkpoint into a folder (the trainer's
periodic evaluation does). Its steps, and where each lives:

1. **Set-up (rank 0)**, agreed by every rank: :mod:`selfflow.batch.setup`. Then every rank
   checks that it sees a file rank 0 wrote in the folder
   (:func:`selfflow.base.distributed.check_shared_folder`).
2. **Verify (all ranks).** Existing shards are read back and checked (CRC, shapes, indices,
   labels); the check is split over the ranks. A shard that fails is deleted and redone.
3. **Sample (all ranks).** Pending shard ``j`` (in plan order) goes to rank ``j % world``. Each
   rank samples its shards' indices in batches of ``--batch-size`` (or N if smaller; a batch
   may span two shards; a short last batch is padded with copies of its last sample, so that
   the network always sees one shape and a sample's bytes never depend on how the work was
   cut) while a background thread decodes, in fixed chunks of ``selfflow.model.vae.DECODE_BATCH``,
   and writes (see :mod:`selfflow.batch.writer`).
   Rank 0 shows one progress bar for the whole batch (:mod:`selfflow.batch.progress`). The
   step ends with a barrier that notices a process that died
   (:func:`selfflow.base.distributed.wait_for_all`), so rank 0 never waits for shards that will
   not come.
4. **Assemble (rank 0)** after a barrier: ``samples_{N}.npz`` streamed shard by shard, then
   ``grid.png`` and the manifest's ``complete`` record; the shards are deleted unless
   ``keep_shards``. With ``eval_ref``, ADM's metrics follow.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError, ReportedOnRankZero
from selfflow.base.files import file_sha256
from selfflow.base.finite import NonFiniteSamplesError
from selfflow.base.lock import FolderLock
from selfflow.base.npz import iter_npz_rows
from selfflow.batch import store
from selfflow.batch.assemble import GRID_SAMPLES, assemble, npz_name
from selfflow.batch.config import (
    VAE_DTYPE,
    BatchConfig,
    BatchResult,
    batch_shape,
    pad_batch,
)
from selfflow.batch.manifest import MANIFEST_NAME, Manifest, write_manifest
from selfflow.batch.progress import BatchProgress, progress_bar
from selfflow.batch.setup import agreed_setup
from selfflow.batch.writer import NOTHING_WRITTEN, ShardWriter, write_pngs

__all__ = ["BatchConfig", "BatchJob", "BatchResult", "ReportedOnRankZero", "generate_fid_batch"]

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
    """Sample ``config.num_samples`` images into ``config.output_dir``; resumable, multi-GPU.

    Writes ``samples_{N}.npz`` (ADM's layout), ``grid.png`` and ``manifest.json``; a folder
    begun with the same settings is continued, one with other settings refused. Under torchrun
    every process calls this with the same config. Returns the result on rank 0, None
    elsewhere. ``context`` reuses an initialised process group (else one is set up and torn
    down here); ``log`` receives the one-line messages (default: print).

    ``prepare_pipeline(pipe)`` may wrap or instrument the loaded pipeline (tests use it); it
    must not change what the images are.
    """
    with distributed.session(config.device, context) as context:
        return BatchJob(config, context, prepare_pipeline, progress, log or _print).run()


def _shards(shards: int, images: int) -> str:
    """Shards and the images they hold, said together: "4 shards (52 images)"."""
    return f"{shards} shard{'s' * (shards != 1)} ({images} image{'s' * (images != 1)})"


def _print(message: str) -> None:
    print(message, flush=True)


class BatchJob:
    """One process's part of one FID batch; :func:`generate_fid_batch` runs it."""

    def __init__(self, config, context, prepare_pipeline, progress, log) -> None:
        self.config = config
        self.context = context
        self.prepare_pipeline = prepare_pipeline
        self.progress = progress and context.is_main
        self.log = log if context.is_main else (lambda message: None)
        self.output_dir = Path(config.output_dir).expanduser()
        from selfflow.base.distributed import resolve_dtype  # torch: imported when a batch runs

        self.dtype_name = str(resolve_dtype(config.dtype, context.device)).removeprefix("torch.")
        self.pipe = None
        self.network = ""
        self.vae_name: str | None = None  # the VAE used (--vae, else the checkpoint's own)
        self.vae_dtype = ""  # the dtype the loaded VAE decodes in (recorded in the manifest)
        self.num_classes: int | None = None  # the model's label space, known once loaded
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
        outcome = agreed_setup(self)
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
            self.pipe = self.load_pipeline(outcome.checkpoint)[0]
        pending = self._verify(outcome.candidates)
        mine = distributed.assign(pending, self.context.rank, self.context.world_size)
        done_before = self.config.num_samples - sum(self.plan.shard(k).size for k in pending)
        left = f"{_shards(len(pending), self.config.num_samples - done_before)} to sample"
        if done_before:
            left = f"{_shards(self.plan.num_shards - len(pending), done_before)} done, {left}"
        self.log(
            f"selfflow sample: {self.config.num_samples} images in {self.plan.num_shards} shards "
            f"of {self.plan.shard_size}: {left} on {self.context.world_size} process(es) "
            f"({self.context.device}, {self.network}, batch {self.config.batch_size} per "
            f"process, VAE in {self.vae_dtype})"
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

    def load_pipeline(self, checkpoint: str | None):
        """Model, VAE and the network path for ``--dtype``; returns ``(pipe, checkpoint path)``."""
        import torch

        from selfflow.model.checkpoint import download_checkpoint
        from selfflow.sampling.pipeline import SelfFlowPipeline

        device = self.context.device
        # No --ckpt: rank 0 downloads the released file (or finds it in the cache) and passes its
        # path on; a process on another node without that path fetches it into its own cache.
        if checkpoint is None or (self.config.checkpoint is None and not Path(checkpoint).exists()):
            checkpoint = str(download_checkpoint())
        pipe = SelfFlowPipeline.from_pretrained(
            checkpoint,
            self.config.vae,  # None: the VAE the checkpoint's card records
            device=device,
            dtype=getattr(torch, self.dtype_name),
            vae_dtype=getattr(torch, VAE_DTYPE),
            allow_vae_mismatch=self.config.allow_vae_mismatch,
        )
        self.vae_name = pipe.vae_name
        self.num_classes = pipe.model.config.num_classes  # labels come from its label space
        self.network = f"{type(pipe.model_fn).__name__}/{self.dtype_name}"
        if self.prepare_pipeline is not None:
            self.prepare_pipeline(pipe)
        self.vae_dtype = str(next(pipe.autoencoder.parameters()).dtype).removeprefix("torch.")
        return pipe, checkpoint

    # -- step 2: verify -----------------------------------------------------------------------

    def _labels(self, indices: np.ndarray) -> np.ndarray:
        from selfflow.base import seeds

        if self.config.class_balanced:
            if self._balanced is None:
                self._balanced = seeds.balanced_labels(
                    self.config.seed, self.config.num_samples, self.num_classes
                )
            return self._balanced[indices]
        return seeds.uniform_labels(self.config.seed, indices.tolist(), self.num_classes).numpy()

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

        config, plan, pipe = self.config, self.plan, self.pipe
        settings = config.sampler_settings()
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
        bar = BatchProgress(self, pending, set(mine), done_before)
        writer = ShardWriter(
            pipe.decode,
            self.output_dir,
            shards,
            tuple(self.manifest.image_shape),
            plan.num_samples,
            save_images=config.save_images,
            on_images=bar.add_own,
        ).start()
        try:
            for start in range(0, len(indices_all), config.batch_size):
                indices = indices_all[start : start + config.batch_size]
                real = len(indices)
                padded = pad_batch(indices, batch)
                labels = self._labels(padded)
                bar.start_batch()
                try:
                    latents = pipe.sample_latents(
                        torch.from_numpy(labels),
                        padded.tolist(),
                        config.seed,
                        settings,
                        progress=bar.on_step,
                    )
                except NonFiniteSamplesError as error:
                    # already named by sample index (a padding row repeats the last one)
                    raise error.explained(NOTHING_WRITTEN) from None
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
            bar.close()

    # -- step 4: assemble, evaluate -----------------------------------------------------------

    def _assemble(self) -> Path:
        from selfflow.base.images import save_grid

        plan, manifest = self.plan, self.manifest
        bar = progress_bar(self.progress, plan.num_samples, "assembling")
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
            from selfflow.base.images import save_grid

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
        if self.pipe is not None:  # free the sampler's memory for the Inception network
            self.pipe = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        from selfflow.eval import evaluator  # torch-heavy: imported when it is needed

        self.log(f"evaluating {result.npz_path} against {self.config.eval_ref}")
        result.metrics = evaluator.evaluate(
            str(self.config.eval_ref),
            str(result.npz_path),
            out_dir=str(self.output_dir),
            inception=str(self.config.inception) if self.config.inception else None,
            device=self.context.device,
        )
        print(evaluator.format_report(result.metrics), flush=True)
