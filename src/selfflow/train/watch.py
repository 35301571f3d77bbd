"""What a researcher watches: TensorBoard, ``log.jsonl``, a progress bar, sample grids, FID.

Rank 0 writes the scalars (loss, flow, rep, gradient norm, learning rate, images/s, steps/s,
and ``data_wait``: the share of the time it waited for its batches) every ``--log-every``
steps, averaged over those steps, to TensorBoard (``RUN/tensorboard``, written by
:mod:`selfflow.train.events` without importing TensorFlow)
and as one JSON line to ``RUN/log.jsonl``; the bar shows steps/s and the ETA, and the images/s
of the last such window (the same number as ``log.jsonl``: the step summaries are read one step
late and in bursts before a checkpoint, so a per-step rate would be meaningless). Lines
with a ``kind`` are the other records: ``"eval"`` metrics, ``"val"`` validation losses at fixed
noise (every ``--val-every`` steps and at step 0: :mod:`selfflow.train.validation`, on every
process) and ``"checkpoint"`` write times (the
trainer's, so a slow file system shows beside the rates it lowers). A resumed run first drops
the records of steps after its checkpoint (they are trained again), in both.

Every ``--sample-every`` steps the EMA samples a grid from fixed labels and fixed start noise
(the same images of the run at every step, so progress is visible): decoded with the dataset's
VAE for latent data, shown as the arrays themselves for pixel data; saved to
``RUN/samples/step_N.png`` and TensorBoard. Every ``--eval-every`` steps the EMA is exported
and the FID batch's own entry, :func:`selfflow.batch.generate_fid_batch`, samples
``--eval-samples`` images on all processes and scores them with the package's evaluator.

The watch reads the run it watches through :class:`WatchedRun`, the few attributes it needs
of the trainer, so the trainer imports the watch and the watch never imports the trainer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.files import replaced_atomically, writing

if TYPE_CHECKING:
    from torch import nn

    from selfflow.data import LatentDataset
    from selfflow.model.card import ModelCard
    from selfflow.train.config import ResolvedConfig
    from selfflow.train.streams import Prefetcher

LOG_NAME = "log.jsonl"
GRID_SAMPLES = 16
GRID_STEPS = 250  # the paper's SDE protocol


def check_watch_options(resolved: ResolvedConfig, dataset) -> None:
    """Refuse evaluation settings that cannot work, before training starts."""
    s = resolved.settings
    if s.val_every:
        from selfflow.train.validation import open_val_data

        open_val_data(s, dataset)  # a mismatch is named now, not at the first validation
    if not s.eval_every:
        return
    if s.eval_ref is None or not Path(s.eval_ref).is_file():
        raise ConfigurationError(f"--eval-ref {s.eval_ref}: no such file")
    if dataset.vae is None:
        raise ConfigurationError(
            f"--eval-every scores images decoded by the dataset's VAE, but {s.data} is stored "
            f"without one (pixel or raw data); ADM's Inception metrics need VAE latents"
        )


def to_pictures(arrays: torch.Tensor, min_size: int = 64) -> np.ndarray:
    """Pixel-space arrays in about [-1, 1] → uint8 ``(N, H, W, 3)``: three channels as RGB,
    others as the first channel in grey; small images enlarged (nearest) to ``min_size``."""
    from selfflow.model.vae import to_uint8

    x = arrays.float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    factor = max(1, -(-min_size // x.shape[-1]))
    if factor > 1:
        x = x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return to_uint8(x)


def _at(every: int, step: int, end: int) -> bool:
    """Whether a ``--*-every`` task (0: never) runs after ``step`` of a run ending at ``end``."""
    return bool(every) and (step % every == 0 or step == end)


def grid_labels(num_classes: int, count: int = GRID_SAMPLES) -> torch.Tensor:
    """Labels spread evenly over the classes (ImageNet's first 16 would all be fish and birds)."""
    return torch.tensor([(i * num_classes) // count for i in range(count)], dtype=torch.int64)


class WatchedRun(Protocol):
    """What the watch reads of the run it watches (:class:`selfflow.train.trainer.Trainer`)."""

    context: distributed.DistributedContext
    resolved: ResolvedConfig
    run_dir: Path
    dataset: LatentDataset  # its class count spreads the grid's labels
    vae: Any  # decodes the grid; None for pixel data
    model: nn.Module  # the online model, unwrapped (sharded under FSDP)
    ema: nn.Module  # sharded under FSDP
    card: ModelCard  # what the evaluation's export carries
    dtype: torch.dtype  # the FID batch samples in it
    prefetch: Prefetcher  # its ``waited`` seconds give ``data_wait``

    def log(self, message: str) -> None:
        """One line to the user (rank 0 prints it)."""
        ...

    @property
    def sharded(self) -> bool:
        """Whether the EMA is sharded (FSDP across processes): gathering it is a collective."""
        ...

    def full_states(
        self, ema_only: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Full CPU state dicts of model, EMA and optimiser on rank 0 (a collective)."""
        ...


class Watch:
    """Logging, the progress bar, sample grids and evaluations of one run (see module doc)."""

    def __init__(self, trainer: WatchedRun, step: int) -> None:
        self.trainer = trainer
        self.main = trainer.context.is_main
        s = trainer.resolved.settings
        self.settings = s
        self.start_step = step
        self.window: list[dict[str, float]] = []
        self.window_started = time.perf_counter()
        self.waited_before = 0.0  # the prefetcher's wait when the window began
        self.images_per_s: float | None = None  # of the last logged window, shown on the bar
        self.writer = None
        self.bar = None
        self.vae = trainer.vae
        self.validation = _validation(trainer) if s.val_every else None
        if self.main:
            self._open(trainer, step)
        if self.validation is not None and step == 0:
            self.validate(0)  # where a new run's curves start

    def _open(self, trainer: WatchedRun, step: int) -> None:
        """Rank 0's log files and progress bar."""
        from tqdm.auto import tqdm

        from selfflow.train.events import EventWriter

        run = trainer.run_dir
        # a resume from the checkpoint of step N keeps what was logged up to N and has
        # TensorBoard drop the events of N + 1 on, which are trained again; a start from step 0
        # (no checkpoint: an attempt killed before its first one) drops everything, its step-0
        # validation included, or each step would show twice
        first_new = step + 1 if step else 0
        _truncate_log(run / LOG_NAME, first_new - 1)
        self.writer = EventWriter(run / "tensorboard", purge_step=first_new)
        s = self.settings
        self.bar = tqdm(
            total=s.steps,
            initial=step,
            unit="step",
            desc="training",
            disable=not s.progress,
            dynamic_ncols=True,
        )

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.window.append(metrics)
        if step % self.settings.log_every == 0 or step == self.settings.steps:
            self._write_scalars(step, time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
            rate = "" if self.images_per_s is None else f"{self.images_per_s:.1f} img/s, "
            self.bar.set_postfix_str(f"{rate}loss {metrics['loss']:.4f}")

    def _write_scalars(self, step: int, now: float) -> None:
        count = len(self.window)
        seconds = max(now - self.window_started, 1e-9)
        record: dict[str, Any] = {"step": step}
        for key in ("loss", "flow", "rep", "grad_norm"):
            record[key] = sum(m[key] for m in self.window) / count
        record["lr"] = self.settings.lr
        record["steps_per_s"] = count / seconds
        record["images_per_s"] = count * self.settings.global_batch_size / seconds
        self.images_per_s = record["images_per_s"]
        # the share of the window this process spent waiting for its batches: 0 while the
        # prefetch thread keeps up, towards 1 when the data (disk, CPU) is the bottleneck
        waited = self.trainer.prefetch.waited
        record["data_wait"] = min(1.0, (waited - self.waited_before) / seconds)
        self.window, self.window_started, self.waited_before = [], now, waited
        if self.main:
            self.log_record(record)

    def log_record(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One line in ``log.jsonl`` and the same scalars in TensorBoard (rank 0)."""
        step = int(record["step"])
        line = {"time": round(time.time(), 3), **record}
        if prefix != "train":
            line["kind"] = prefix
        path = self.trainer.run_dir / LOG_NAME
        with writing(path), open(path, "a") as handle:  # a full disk: one line naming it
            handle.write(json.dumps(line) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def due(self, step: int, end: int) -> bool:
        """Whether :meth:`periodic` has work after ``step``."""
        s = self.settings
        every = (s.sample_every, s.eval_every, s.val_every)
        return any(_at(n, step, end) for n in every)

    def periodic(self, step: int, end: int) -> None:
        s = self.settings
        if _at(s.val_every, step, end):
            self.validate(step)
        if _at(s.sample_every, step, end):
            self.sample_grid(step)
        if _at(s.eval_every, step, end):
            self.evaluate(step)

    def validate(self, step: int) -> None:
        """The validation loss at fixed noise (every process), logged as ``kind: "val"``."""
        values = self.validation(self.trainer.model, self.trainer.ema)
        if self.main:
            self.log_record({"step": step, **values}, prefix="val")
            broken = [k for k, v in values.items() if not math.isfinite(v)]
            if broken:  # the held-out shards are size-checked, not hashed, so say where to look
                folder = self.settings.val_data
                self.trainer.log(
                    f"warning: the validation of step {step} is not finite ({len(broken)} "
                    f"values, e.g. {broken[0]}): --val-data {folder} may hold damaged latents; "
                    f"check them with `selfflow prepare --verify {folder}`"
                )

    # -- samples ------------------------------------------------------------------------------

    def _ema_module(self):
        """A plain module holding the EMA weights (rank 0); a collective under FSDP."""
        trainer = self.trainer
        if not trainer.sharded:
            return trainer.ema
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from selfflow.model.network import SelfFlowDiT

        full = get_model_state_dict(
            trainer.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.main:
            return None
        model = SelfFlowDiT(trainer.resolved.model)
        model.load_state_dict(full)
        return model.to(trainer.context.device).requires_grad_(False)

    def sample_grid(self, step: int) -> None:
        """Sample the fixed grid with the EMA and save it (rank 0 samples, the others wait)."""
        from selfflow.base.images import image_grid, save_png
        from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline

        ema = self._ema_module()
        if self.main:
            trainer = self.trainer
            labels = grid_labels(trainer.dataset.num_classes)  # classes it has seen
            pipe = SelfFlowPipeline(
                ema, self.vae, device=trainer.context.device, latent=trainer.card.convention
            )
            latents = pipe.sample_latents(
                labels,
                list(range(len(labels))),
                self.settings.seed,
                SamplerSettings(num_steps=GRID_STEPS, mode="sde"),
            )
            pictures = pipe.decode(latents) if self.vae is not None else to_pictures(latents)
            grid = image_grid(pictures, columns=int(len(labels) ** 0.5))
            folder = trainer.run_dir / "samples"
            folder.mkdir(exist_ok=True)
            save_png(grid, folder / f"step_{step:09d}.png")
            self.writer.add_image("samples", grid, step)
            self.writer.flush()
        distributed.barrier(self.trainer.context)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> None:
        """Export the EMA, run the FID batch on every process, log ADM's metrics (rank 0)."""
        from selfflow.batch import BatchConfig, generate_fid_batch
        from selfflow.train import state as run_state
        from selfflow.train.export import write_export

        trainer = self.trainer
        folder = trainer.run_dir / "eval" / f"step_{step:09d}"
        export = run_state.export_path(trainer.run_dir, step)
        if not export.is_file():
            export = folder / "ema.pt"
            _, ema, _ = trainer.full_states(ema_only=True)
            if self.main:
                write_export(trainer.resolved.model, ema, export, trainer.card)
        distributed.barrier(trainer.context)
        config = BatchConfig(
            checkpoint=str(export),
            output_dir=folder,
            num_samples=self.settings.eval_samples,
            batch_size=self.settings.batch_size,
            seed=self.settings.seed,
            vae=None,  # the export's own (its card records the run's VAE)
            dtype="bfloat16" if trainer.dtype == torch.bfloat16 else "float32",
            eval_ref=self.settings.eval_ref,
        )
        result = generate_fid_batch(
            config, context=trainer.context, progress=self.main and self.settings.progress
        )
        if self.main and result is not None and result.metrics:
            scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
            self.log_record({"step": step, **scalars}, prefix="eval")
            result.npz_path.unlink(missing_ok=True)  # 2 GB per 10 000 images; the scores stay
        distributed.barrier(trainer.context)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _validation(trainer: WatchedRun):
    from selfflow.train.validation import Validation, open_val_data

    s = trainer.resolved.settings
    return Validation(
        trainer.resolved,
        open_val_data(s, trainer.dataset),
        trainer.context,
        autocast=torch.bfloat16 if trainer.dtype == torch.bfloat16 else None,
        sharded=trainer.sharded,
        latent=trainer.dataset.latent,
    )


def _step_of(line: str, torn: int) -> int:
    """The step of a ``log.jsonl`` line; ``torn`` for a blank line or one cut short (the disk
    filled up, or the process was killed, half way through appending it)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return torn


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (the run logs them again; -1: all of them)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line, step + 1) <= step]
    with replaced_atomically(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
