"""``selfflow prepare``: an ImageFolder tree → ADM crop → SD-VAE posterior → dataset shards.

Steps, and who does each (one process, or every process that torchrun starts):

1. **Set-up (rank 0).** Check the options, lock ``OUT_DIR`` against a second run, load the VAE
   (its encoder's weights are hashed: that is the VAE's identity), list the images, and compare
   with the manifest of an earlier run in ``OUT_DIR``: the same settings resume; others are
   refused, naming each difference, unless ``--overwrite``. The other ranks wait for the outcome,
   so a bad option fails once, before any encoding.
2. **The plan** cuts the file list into consecutive shards of ``--shard-size`` images. It
   depends on the file list (and the shard size) alone, never on the number of processes or the
   batch size, so a finished shard is valid whoever made it.
3. **Verify (all ranks).** Shards that an earlier run finished are re-hashed against their
   records (split over the ranks); a shard that fails is deleted and redone.
4. **Encode (all ranks).** Pending shard ``j`` goes to rank ``j % world``. Worker processes
   (``--num-workers``) decode and crop images in batches that never span two shards, while the
   main process encodes the previous batch. A shard is written when its last batch is encoded.
5. **Finish (rank 0)** after all ranks are done: ``labels.npy`` and the complete manifest.

Each image's posterior depends only on its own pixels and its batch (batches are cut the same
way within each shard whatever the number of processes), so one process and several write the
same bytes, and so does a run that was killed and resumed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError, DatasetError, ReportedOnRankZero
from selfflow.base.files import check_can_write, remove_temporaries
from selfflow.base.lock import FolderLock
from selfflow.data import holdout, latent_stats, store
from selfflow.data.images import (
    CroppedImages,
    SourceList,
    collate,
    end_with_parent,
    list_image_folder,
    listing,
)
from selfflow.data.latent_stats import NORMS
from selfflow.data.summary import PrepareResult
from selfflow.model.latents import convention_of_vae

CROP = "adm_center_crop"
# Settings that must match to resume in a folder, with how a difference is described.
COMPARED = ("image_size", "crop", "vae_identity", "dtype", "shard_size", "latent_shape", "scale")
COMPARED += ("latent", "latent_norm")
# A manifest of an earlier version records neither: SD-VAE's latents (its "scale" is compared)
LEGACY = {"latent_norm": "none"}
POLL_SECONDS = 2.0  # how often rank 0 looks for other ranks' finished shards


@dataclass
class PrepareConfig:
    """Every option of ``selfflow prepare``."""

    image_dir: str | os.PathLike
    out_dir: str | os.PathLike
    image_size: int = 256
    vae: str | None = None
    dtype: str = "float32"
    batch_size: int = 64
    num_workers: int = 8
    limit: int | None = None
    classes: int | None = None
    shard_size: int = store.DEFAULT_SHARD_SIZE
    skip_bad_images: bool = False
    overwrite: bool = False
    device: str | None = None
    val_per_class: int | None = None  # hold out N images per class into OUT_DIR-val (holdout)
    latent_norm: str = "none"

    def validate(self) -> None:
        """Option checks that need no file: fail before anything is loaded."""

        def whole(name: str, value: Any, minimum: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigurationError(f"{name} must be {what}; got {value!r}")

        whole("--image-size", self.image_size, 1, "a positive number of pixels")
        whole("--batch-size", self.batch_size, 1, "a positive number of images")
        whole("--num-workers", self.num_workers, 0, "0 (decode in the main process) or more")
        whole("--shard-size", self.shard_size, 1, "a positive number of images")
        if self.limit is not None:
            whole("--limit", self.limit, 1, "a positive number of images per class")
        if self.classes is not None:
            whole("--classes", self.classes, 1, "a positive number of classes")
        if self.val_per_class is not None:
            whole("--val-per-class", self.val_per_class, 1, "a positive number of images")
        if self.latent_norm not in NORMS:
            raise ConfigurationError(
                f"--latent-norm must be one of {NORMS}; got {self.latent_norm!r}"
            )
        if self.dtype not in store.STORED_DTYPES:
            raise ConfigurationError(
                f"--dtype must be one of {store.STORED_DTYPES}; got {self.dtype!r}"
            )
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigurationError(f"OUT_DIR {out} is a file; expected a folder")
        if Path(self.image_dir).resolve() == out.resolve():
            raise ConfigurationError(
                "OUT_DIR must not be IMAGE_DIR (its files would become a class)"
            )
        check_can_write(out, f"OUT_DIR {out}")  # a read-only target fails now, not after the VAE
        if out.is_dir():
            check_out_dir(out)


@dataclass
class _Plan:
    """What rank 0 decided, sent to every rank."""

    source: SourceList
    header: dict[str, Any]
    finished: list[int]  # shards with a record, to verify
    complete: bool = False

    @property
    def num_shards(self) -> int:
        return -(-len(self.source.files) // self.header["shard_size"])

    def shard_range(self, shard_id: int) -> range:
        size = self.header["shard_size"]
        return range(shard_id * size, min((shard_id + 1) * size, len(self.source.files)))


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_dataset(
    config: PrepareConfig,
    *,
    context: distributed.DistributedContext | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrepareResult | None:
    """Run ``selfflow prepare``; returns the result on rank 0, None on the other ranks."""
    config.validate()
    jobs = holdout.parts(config)  # OUT_DIR, then OUT_DIR-val with --val-per-class
    with distributed.session(config.device, context) as context:
        results = [_run_part(c, part, context, progress, log or _print) for part, c in jobs]
    if results[0] is not None and len(results) > 1:
        results[0].held_out = results[1]
    return results[0]


def _run_part(config: PrepareConfig, part: str, context, progress, log) -> PrepareResult | None:
    lock = FolderLock(config.out_dir, "selfflow prepare", "OUT_DIR")
    try:
        return _Job(config, context, lock, progress, log, part).run()
    finally:
        lock.release()


class _Job:
    def __init__(
        self,
        config: PrepareConfig,
        context: distributed.DistributedContext,
        lock: FolderLock,
        progress: bool,
        log: Callable[[str], None],
        part: str = "all",
    ) -> None:
        self.config, self.part = config, part
        self.context = context
        self.lock = lock
        self.progress = progress and context.is_main
        self.log = log if context.is_main else (lambda message: None)
        self.out = Path(config.out_dir)
        self.vae: Any = None

    def run(self) -> PrepareResult | None:
        start = time.perf_counter()
        plan = self._agreed_setup()
        if plan.complete:
            self.log(f"selfflow prepare: {self.out} is already complete; nothing to do")
            return self._result(0, 0.0) if self.context.is_main else None
        distributed.check_shared_folder(self.context, self.out)
        if self.vae is None:
            self.vae = self._load_vae()
        pending = self._verify(plan)
        mine = distributed.assign(pending, self.context.rank, self.context.world_size)
        total = sum(len(plan.shard_range(k)) for k in pending)
        if total:
            done = plan.num_shards - len(pending)
            self.log(
                f"selfflow prepare: {total} images to encode in {len(pending)} shards "
                f"({done} of {plan.num_shards} already done) on {self.context.world_size} "
                f"process{'es' if self.context.world_size > 1 else ''}"
            )
        bar = _Progress(self, plan, pending, mine, total)
        encoding = time.perf_counter()
        try:
            self._encode(plan, mine, bar)
            distributed.wait_for_all(self.context, bar.poll)
            bar.poll()  # the shards other ranks finished after the last look
        finally:
            bar.close()
        if not self.context.is_main:
            return None
        seconds = time.perf_counter() - encoding
        records = self._finish(plan)
        encoded = sum(record["count"] for record in records if record["id"] in set(pending))
        return self._result(encoded, seconds, encoding - start)

    # -- set-up ---------------------------------------------------------------------------------

    def _agreed_setup(self) -> _Plan:
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

    def _load_vae(self) -> Any:
        from selfflow.model.vae import SD_VAE_ID, load_vae

        vae = load_vae(
            self.config.vae or SD_VAE_ID, device=self.context.device, dtype=torch.float32
        )
        return vae

    def _setup(self) -> _Plan:
        config = self.config
        source = list_image_folder(config.image_dir, classes=config.classes, limit=config.limit)
        source, held = holdout.split(source, config.val_per_class, self.part, self.out)
        if source.not_images and not config.skip_bad_images:
            raise DatasetError(
                f"{len(source.not_images)} files in {source.root} are not images (by their "
                f"extension): {', '.join(source.not_images[:8])}"
                + (" ..." if len(source.not_images) > 8 else "")
                + "; remove them, or pass --skip-bad-images to leave them out (they are listed "
                "in the manifest)"
            )
        self.vae = self._load_vae()  # a VAE that cannot be had leaves no OUT_DIR behind
        convention_of_vae(self.vae).check_image_size(config.image_size)  # before any folder
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        header = {**self._header(source), **({"holdout": held} if held else {})}
        stored = store.stored_manifest(self.out)
        if stored is not None and config.overwrite:
            store.clear_dataset(self.out)
            stored = None
        if stored is None:
            if (self.out / store.SHARD_DIR).is_dir() and any(
                (self.out / store.SHARD_DIR).iterdir()
            ):
                if not config.overwrite:
                    raise DatasetError(
                        f"{self.out / store.SHARD_DIR} holds files but {self.out} has no "
                        f"manifest.json, so what made them is unknown; pass --overwrite to start over"
                    )
                store.clear_dataset(self.out)
            store.write_json(self.out / store.MANIFEST_NAME, {**header, **_format_fields(False)})
        else:
            differences = _differences(stored, header)
            if differences:
                raise DatasetError(
                    f"{self.out} holds another dataset: " + "; ".join(differences) + ". Choose "
                    "another OUT_DIR, or pass --overwrite to delete it and start over"
                )
            if stored.get("complete") and _all_shards_present(self.out, stored):
                return _Plan(source, header, [], complete=True)
            # a finished dataset with shards deleted (damaged ones, as verification advises):
            # resume, which re-hashes every shard left and re-encodes the missing ones
        remove_temporaries([self.out, self.out / store.SHARD_DIR])
        plan = _Plan(source, header, [])
        plan.finished = [
            k for k in range(plan.num_shards) if store.shard_record_path(self.out, k).is_file()
        ]
        return plan

    def _header(self, source: SourceList) -> dict[str, Any]:
        from selfflow.base.precision import full_fp32
        from selfflow.model.card import resolved_vae_name
        from selfflow.model.vae import SD_VAE_ID, encode_posterior, encoder_record

        size = self.config.image_size
        convention = convention_of_vae(self.vae)
        with full_fp32():
            probe, _ = encode_posterior(self.vae, np.zeros((1, size, size, 3), dtype=np.uint8))
        return {
            "latent_shape": list(probe.shape[1:]),
            "latent": convention.to_dict(),  # statistics added at the end (--latent-norm)
            "latent_norm": self.config.latent_norm,
            "dtype": self.config.dtype,
            "has_std": True,
            "scale": convention.scaling_factor,
            # where it loads from on any working folder (a relative folder, made absolute)
            "vae": resolved_vae_name(self.config.vae or SD_VAE_ID),
            "vae_identity": encoder_record(self.vae),
            "image_size": size,
            "crop": CROP,
            "class_names": source.class_names,
            "files_digest": source.digest,
            "num_files": len(source.files),
            "source": {
                "root": str(source.root.resolve()),
                "limit": self.config.limit,
                "classes": self.config.classes,
            },
            "shard_size": self.config.shard_size,
            "skipped": [
                {"file": name, "reason": "not an image file (by its extension)"}
                for name in source.not_images
            ],
        }

    # -- verify -----------------------------------------------------------------------------------

    def _verify(self, plan: _Plan) -> list[int]:
        """Re-hash the shards an earlier run finished (split over the ranks); the rest is pending."""
        mine = distributed.assign(plan.finished, self.context.rank, self.context.world_size)
        good = [k for k in mine if self._shard_is_sound(plan, k)]
        verified = {k for part in distributed.all_gather_objects(self.context, good) for k in part}
        redone = len(plan.finished) - len(verified)
        if redone:
            self.log(f"selfflow prepare: {redone} damaged or unfinished shards will be redone")
        return [k for k in range(plan.num_shards) if k not in verified]

    def _shard_is_sound(self, plan: _Plan, shard_id: int) -> bool:
        """A finished shard's array matches its record's sha256, and its labels are the plan's
        (minus skipped files); otherwise both files are deleted."""
        record = store.read_shard_record(self.out, shard_id)
        if record is not None:
            indices = plan.shard_range(shard_id)
            skipped = {entry["file"] for entry in record.get("skipped", [])}
            kept = [i for i in indices if plan.source.files[i] not in skipped]
            expected = [int(plan.source.labels[i]) for i in kept]
            if record["labels"] == expected and len(kept) + len(skipped) == len(indices):
                return True
        store.shard_record_path(self.out, shard_id).unlink(missing_ok=True)
        store.shard_array_path(self.out, shard_id).unlink(missing_ok=True)
        return False

    # -- encode ---------------------------------------------------------------------------------

    def _loader(self, plan: _Plan, shards: list[int]) -> torch.utils.data.DataLoader:
        """Batches of decoded crops, cut within each shard, decoded ahead by the workers."""
        size = self.config.batch_size
        batches = []
        for shard_id in shards:
            indices = list(plan.shard_range(shard_id))
            batches += [indices[i : i + size] for i in range(0, len(indices), size)]
        dataset = CroppedImages(plan.source.root, plan.source.files, self.config.image_size)
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate,
            prefetch_factor=4 if workers else None,
            worker_init_fn=functools.partial(_start_worker, self.lock),
        )

    def _encode(self, plan: _Plan, shards: list[int], bar: _Progress) -> None:
        """Encode ``shards`` with TF32 off (full float32 matmuls and convolutions, as the
        evaluator does), so the stored posteriors do not depend on the GPU generation."""
        from selfflow.base.precision import full_fp32
        from selfflow.model.vae import encode_posterior

        if not shards:
            return
        shard_size = plan.header["shard_size"]
        buffer: _ShardBuffer | None = None
        for batch in self._loader(plan, shards):
            shard_id = batch[0].index // shard_size
            if buffer is None:
                capacity = len(plan.shard_range(shard_id))
                buffer = _ShardBuffer(shard_id, capacity, plan.header)
            good = [item for item in batch if self._accept(plan, item, buffer)]
            if good:
                with full_fp32():
                    pixels = np.stack([item.pixels for item in good])
                    mean, std = encode_posterior(self.vae, pixels)
                _check_finite(plan, good, mean, std)
                buffer.add(
                    mean.numpy(), std.numpy(), [int(plan.source.labels[i.index]) for i in good]
                )
                buffer.upscaled += sum(item.upscaled for item in good)
            bar.advance(len(batch))
            if batch[-1].index == plan.shard_range(shard_id)[-1]:
                buffer.write(self.out, plan.header)
                buffer = None

    def _accept(self, plan: _Plan, item: Any, buffer: _ShardBuffer) -> bool:
        """True for a decoded image; a bad one stops the run, or is recorded as skipped."""
        if item.error is None:
            return True
        name = plan.source.files[item.index]
        if not self.config.skip_bad_images:
            raise DatasetError(
                f"{plan.source.root / name} cannot be read as an image ({item.error}); repair "
                f"or delete it, or pass --skip-bad-images to leave bad files out (they are "
                f"listed in the manifest); finished shards are kept, so rerunning resumes"
            )
        buffer.skipped.append({"file": name, "reason": item.error})
        return False

    # -- finish ---------------------------------------------------------------------------------

    def _finish(self, plan: _Plan) -> list[dict[str, Any]]:
        """Write labels.npy and the complete manifest; returns every shard's record."""
        records = []
        for shard_id in range(plan.num_shards):
            path = store.shard_record_path(self.out, shard_id)
            try:
                records.append(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError) as error:
                raise DatasetError(
                    f"shard {shard_id} was not written ({path}: {error}); rerun the same command"
                ) from error
        store.finalize(self.out, latent_stats.finished_header(plan.header, records), records)
        return records

    def _result(self, new_images: int, seconds: float, startup: float = 0.0) -> PrepareResult:
        manifest = store.read_manifest(self.out)
        return PrepareResult(
            out_dir=self.out,
            num_images=manifest["num_images"],
            new_images=new_images,
            skipped=[entry["file"] for entry in manifest["skipped"]],
            upscaled=manifest["upscaled"],
            seconds=seconds,
            world_size=self.context.world_size,
            identity=manifest["identity"],
            startup_seconds=startup,
        )


class _ShardBuffer:
    """One shard's encoded rows until its last batch is in: one array of ``--shard-size``
    rows in the stored dtype, filled in place, so a process holds one shard and no copies."""

    def __init__(self, shard_id: int, capacity: int, header: dict[str, Any]) -> None:
        self.id = shard_id
        self.rows = np.empty((capacity, 2, *header["latent_shape"]), dtype=header["dtype"])
        self.count = 0
        self.labels: list[int] = []
        self.skipped: list[dict[str, str]] = []
        self.upscaled = 0

    def add(self, mean: np.ndarray, std: np.ndarray, labels: list[int]) -> None:
        stop = self.count + len(labels)
        self.rows[self.count : stop, 0] = mean  # float16 storage: rounded to nearest here
        self.rows[self.count : stop, 1] = std
        self.count = stop
        self.labels += labels

    def write(self, out: Path, header: dict[str, Any]) -> None:
        extra: dict[str, Any] = {"skipped": self.skipped, "upscaled": self.upscaled}
        extra |= latent_stats.shard_extra(header, self.rows[: self.count])
        store.write_shard(out, self.id, self.rows[: self.count], np.asarray(self.labels), extra)


class _Progress:
    """Rank 0's bar over every pending image: its own as they are encoded, the other ranks'
    as their shard records appear."""

    def __init__(self, job: _Job, plan: _Plan, pending: list[int], mine: list[int], total: int):
        from tqdm.auto import tqdm

        self.job, self.plan = job, plan
        self.others = [k for k in pending if k not in set(mine)] if job.context.is_main else []
        self.bar = tqdm(
            total=total,
            unit="img",
            desc="prepare",
            disable=not job.progress or not total,
            smoothing=0.05,
        )
        self.last_poll = time.monotonic()

    def advance(self, count: int) -> None:
        self.bar.update(count)
        if time.monotonic() - self.last_poll > POLL_SECONDS:
            self.poll()

    def poll(self) -> None:
        self.last_poll = time.monotonic()
        done = [k for k in self.others if store.shard_record_path(self.job.out, k).is_file()]
        for shard_id in done:
            self.bar.update(len(self.plan.shard_range(shard_id)))
        self.others = [k for k in self.others if k not in set(done)]

    def close(self) -> None:
        self.bar.close()


def _start_worker(lock: FolderLock, worker_id: int) -> None:
    """Set up a decoding worker: it does not hold OUT_DIR's lock, and it ends with its parent."""
    lock.drop_in_child(worker_id)
    end_with_parent()


def _check_finite(plan: _Plan, items: list[Any], mean: torch.Tensor, std: torch.Tensor) -> None:
    bad = ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1))
    if bool(bad.any()):
        names = [plan.source.files[items[i].index] for i in bad.nonzero().flatten().tolist()]
        raise DatasetError(f"the VAE encoder gave NaN or inf for {', '.join(names)}")


def _format_fields(complete: bool) -> dict[str, Any]:
    return {
        "format": store.FORMAT_NAME,
        "format_version": store.FORMAT_VERSION,
        "complete": complete,
    }


def _all_shards_present(out: Path, manifest: dict[str, Any]) -> bool:
    """Every shard a finished manifest lists still has its array and its record."""
    return all(
        (out / entry["file"]).is_file() and (out / entry["file"]).with_suffix(".json").is_file()
        for entry in manifest.get("shards", [])
    )


def check_out_dir(out: Path) -> None:
    """Refuse an OUT_DIR holding anything but a (partial) dataset, a run folder or a sample
    batch say: the shards would land among its files, and --overwrite would not clear them."""
    others = [] if store.stored_manifest(out) is not None else store.foreign_entries(out)
    if others:
        raise DatasetError(
            f"OUT_DIR {out} is not empty and holds no selfflow dataset: {listing(others)}; "
            f"prepare writes a dataset into a new or empty folder (or continues one it "
            f"started): choose another OUT_DIR"
        )


def _short(value: Any) -> str:
    return str(value)[:16] if isinstance(value, str) else repr(value)


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``what: X in the folder, Y now`` for every setting that differs."""
    found = []
    for name in COMPARED:
        if name == "latent" and stored.get(name) is not None:  # statistics: measured at the end
            recorded = {**stored[name], "mean": None, "std": None}
        else:
            recorded = stored.get(name, LEGACY.get(name, current[name]))
        if recorded != current[name]:
            if name == "vae_identity":
                found.append(
                    f"VAE encoder: {stored.get('vae')} ({_short(stored.get(name))}...) in the "
                    f"folder, {current['vae']} ({_short(current[name])}...) now"
                )
            else:
                found.append(f"{name}: {recorded!r} in the folder, {current[name]!r} now")
    if stored.get("class_names") != current["class_names"]:
        old = stored.get("class_names") or []
        found.append(
            f"classes: {len(old)} ({', '.join(map(str, old[:3]))}, ...) in the folder, "
            f"{len(current['class_names'])} ({', '.join(current['class_names'][:3])}, ...) now"
        )
    if stored.get("files_digest") != current["files_digest"]:
        found.append(
            f"source file list: {stored.get('num_files')} files (digest "
            f"{_short(stored.get('files_digest'))}) in the folder, {current['num_files']} files "
            f"(digest {_short(current['files_digest'])}) now"
        )
    return found
