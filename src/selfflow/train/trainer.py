"""The training loop: one process or many under ``torchrun``, DDP or FSDP2, exact resume.

Read top to bottom, :func:`train` does:

1. **Check** the options (no file touched), open the dataset, resolve the model and batch split
   from the data's shape and the process count; rank 0 then locks the run folder, compares it
   with ``run.json`` (another run's folder is refused, naming the difference), checks the free
   space, and every rank learns the outcome before any work.
2. **Build** the model from a seed-keyed initialisation (or ``--init-from``), the EMA as its
   exact float32 copy, and restore the newest intact checkpoint if there is one (model, EMA,
   optimiser, step). Both become :class:`~selfflow.train.network.FastTrainingDiT` (same
   parameters, each block's modulation computed once per distinct time) unless
   ``--network plain``; then wrap: DDP (NCCL on GPUs, gloo on CPUs) or FSDP2 ``fully_shard``.
3. **Loop** over steps. Step k's global batch comes from keyed streams
   (:mod:`selfflow.train.streams`), prepared one step ahead on a thread; each process takes its
   rows and splits them into micro-batches (gradient accumulation); the loss of each is scaled
   so the summed gradient is the global batch's mean, whatever the split. Then the gradient is
   clipped, AdamW steps and the EMA follows (:class:`~selfflow.train.step.TrainStep`, queued on
   the device without waiting). Each step's numbers are read one step later; before any
   checkpoint, sample grid or evaluation all of them are read, and a non-finite loss or norm
   stops the run, so nothing computed from it is kept. Checkpoints every
   ``--checkpoint-every`` steps, on SIGTERM/SIGINT and at the end; TensorBoard, ``log.jsonl``,
   sample grids and FID evaluations as asked (:mod:`selfflow.train.watch`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError, SelfFlowError
from selfflow.data.verify import ShardRecord, verify_report
from selfflow.model.network import SelfFlowDiT
from selfflow.train import state as run_state
from selfflow.train.config import ResolvedConfig, TrainConfig, differences, label_space_note
from selfflow.train.cost import run_cost_lines
from selfflow.train.ema import make_ema
from selfflow.train.network import FastTrainingDiT, compile_errors, compiles, training_optimizer
from selfflow.train.parallel import TrainerProcesses
from selfflow.train.posthoc import PosthocEMA
from selfflow.train.run_card import run_card, vae_plan_line
from selfflow.train.step import StepRecipe, SummaryReader, TrainStep
from selfflow.train.streams import (
    MicroBatch,
    Prefetcher,
    draw_step,
    materialise,
    micro_batches,
    process_range,
    run_streams,
)
from selfflow.train.weights import initial_model, read_init


class NonFiniteLossError(SelfFlowError):
    """The loss or the gradient norm became NaN or infinite; nothing computed from that step on
    was saved (the newest checkpoint is from before it)."""


class StoppedBySignal(SelfFlowError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    export: Path | None
    seconds: float
    last_metrics: dict[str, float]
    rank: int = 0  # the process that returned it (only rank 0 reports)


def train(
    config: TrainConfig,
    *,
    context: distributed.DistributedContext | None = None,
    log: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> TrainResult:
    """Train (or resume) the run ``config.output_dir``; returns where it stands at the end.

    ``dry_run``: make every check a start makes and log the plan, but write and train nothing
    (for a login node, before a job waits in a queue only to fail on a typo).
    """
    config.validate()
    if dry_run:  # no process group: rank 0 checks and plans for the job's processes alone
        context = context or distributed.planning_context(config.device)
        if not context.is_main:
            return TrainResult(0, None, None, 0.0, {}, context.rank)
        return Trainer(config, context, log or _print, dry_run).run()
    with distributed.session(config.device, context) as context:
        return Trainer(config, context, log or _print).run()


def _print(message: str) -> None:
    print(message, flush=True)


class _SignalFlag:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; a second Ctrl-C stops at once.
    Restores the handlers on exit.

    The flag is asked at the end of each step's backward passes and travels in that step's
    summary, which every process reads one step later: the run then finishes the step in
    progress, checkpoints and stops, on every process after the same step (one or two steps
    after the signal).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def raised(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """One training run on this process (see the module docstring for the order of things)."""

    def __init__(
        self,
        config: TrainConfig,
        context: distributed.DistributedContext,
        log: Callable[[str], None],
        dry_run: bool = False,
    ) -> None:
        self.config = config
        self.context = context
        self._log = log
        self.run_dir = Path(config.output_dir)
        self.lock = None
        self.last_checkpoint: Path | None = None
        self.last_export: Path | None = None
        self.dry_run = dry_run

    @property
    def sharded(self) -> bool:
        """FSDP across several processes (``--fsdp`` alone in one process shards nothing). The
        process count, not a joined group: a dry run plans the job's processes without one."""
        return self.config.fsdp and self.context.world_size > 1

    def log(self, message: str) -> None:
        if self.context.is_main:
            self._log(message)

    # -- 1. check ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from selfflow.base.errors import ReportedOnRankZero

        try:
            try:
                self._prepare()
            except SelfFlowError as error:
                failed = distributed.all_gather_objects(self.context, str(error))
                if self.context.is_main:
                    raise
                raise ReportedOnRankZero(failed[0]) from error
            else:
                failed = distributed.all_gather_objects(self.context, None)
                if any(failed):
                    raise ReportedOnRankZero(next(f for f in failed if f))
            if self.dry_run:
                return self._dry_run()
            # rank 0 writes the checkpoints every process resumes from: one shared folder
            distributed.check_shared_folder(self.context, self.run_dir)
            return self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _prepare(self) -> None:
        """Everything that can fail on the user's input, before any training work."""
        from selfflow.data import LatentDataset
        from selfflow.train.watch import check_watch_options

        config = self.config
        self.dataset = LatentDataset(config.data)
        if len(self.dataset) == 0:
            raise ConfigurationError(f"the dataset {config.data} holds no images")
        self.resolved: ResolvedConfig = config.resolve(
            tuple(self.dataset.latent_shape), self.dataset.num_classes, self.context.world_size
        )
        label_note = label_space_note(self.dataset.class_names, self.resolved.model.num_classes)
        for note in [*self.resolved.notes, *filter(None, [label_note])]:
            self.log(f"note: {note}")
        self.dtype = distributed.resolve_dtype(config.dtype, self.context.device)
        check_watch_options(self.resolved, self.dataset)
        self.vae_name, self.card = run_card(
            self.dataset,
            self.config,
            self.resolved.settings,
            check=self.context.is_main or self.dry_run,
            log=self.log,
        )
        self.init_state = None
        if not run_state.list_checkpoints(self.run_dir):
            self.init_state = read_init(self.resolved, config.init_from)
        elif config.init_from:
            self.log(f"note: {self.run_dir} has checkpoints; resuming, --init-from is not read")
        if config.fsdp and not self.sharded:
            self.log("note: --fsdp with a single process shards nothing; training unsharded")
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            self.num_parameters = sum(
                p.numel() for p in SelfFlowDiT(self.resolved.model).parameters()
            )
        self.vae = None
        if self.dry_run:
            self._check_run_folder()
        elif self.context.is_main:
            self._claim_run_folder()
            if self.resolved.settings.sample_every and self.vae_name is not None:
                from selfflow.model.vae import load_vae  # the grid decodes with the data's own VAE

                self.vae = load_vae(self.vae_name, device=self.context.device)

    def _claim_run_folder(self) -> None:
        from selfflow.base.files import check_can_write
        from selfflow.base.lock import FolderLock

        check_can_write(self.run_dir, f"--output-dir {self.run_dir}")  # read-only: say so now
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.run_dir, "selfflow train", "--output-dir").acquire()
        run_state.check_run_record(self.run_dir, self.record())
        removed = run_state.remove_temporaries(self.run_dir)
        if removed:
            self.log(f"removed {removed} temporary files of an interrupted run")
        run_state.check_free_space(self.run_dir, run_state.state_bytes(self.num_parameters))

    def _check_run_folder(self) -> None:
        """The dry run's read-only twin of :meth:`_claim_run_folder` (and the VAE's lookup)."""
        from selfflow.base.files import check_can_write
        from selfflow.base.lock import busy_error, lock_holder

        holder = lock_holder(self.run_dir)
        if holder is not None:
            raise busy_error(self.run_dir, holder, "--output-dir")
        check_can_write(self.run_dir, f"--output-dir {self.run_dir}")
        run_state.check_run_record(self.run_dir, self.record(), write=False)
        run_state.check_free_space(self.run_dir, run_state.state_bytes(self.num_parameters))
        if self.vae_name is not None:
            self.log(vae_plan_line(self.vae_name, self.resolved.settings))

    def record(self) -> dict[str, Any]:
        return {"identity": self.resolved.identity(), "dataset": self.dataset.identity}

    # -- 2. build -----------------------------------------------------------------------------

    def _build(self) -> int:
        """Model, EMA, optimiser on this process's device, restored when resuming; the step."""
        restored = self._find_checkpoint()
        # a resume takes every weight from the checkpoint; --init-from only seeds a new run
        if restored is None and self.init_state is None and self.config.init_from:
            # only damaged checkpoints were found: the run starts over, from --init-from
            self.init_state = read_init(self.resolved, self.config.init_from)
        model = initial_model(self.resolved, None if restored else self.init_state)
        self.init_state = None  # copied into the model; do not hold a second set of weights
        ema = make_ema(model)  # an exact copy at step 0
        step = 0
        if restored is not None:
            state, path = restored
            model.load_state_dict(state["model"], strict=True)
            ema.load_state_dict(state["ema"], strict=True)
            step = int(state["step"])
            self.last_checkpoint = path
        if self.resolved.settings.rep_weight == 0:
            # no representation loss: the projector gets no gradient, so it must not be a
            # trained parameter (DDP would wait for its gradient forever)
            model.projector.requires_grad_(False)
        if self.config.network == "fast":
            # same parameters and state dict, modulation computed once per distinct time
            compile = self.config.compile
            model = FastTrainingDiT.from_model(model, compile=compile)
            ema = FastTrainingDiT.from_model(ema, compile=compile)
        device = self.context.device
        self.posthoc = PosthocEMA.build(self.resolved.settings, model, restored, device)
        self.model, self.ema = model.to(device), ema.to(device)
        self.student, self.teacher = self._wrap(self.model, self.ema)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = training_optimizer(  # the recipe's betas, eps and weight decay
            params,
            lr=self.config.lr,
            fused=False if self.sharded else None,  # fused on CUDA, unless params are DTensors
        )
        if restored is not None:
            self._load_optimizer(restored[0]["optimizer"])
        self.step = TrainStep(
            student=self.student,
            teacher=self.teacher,
            model=self.model,
            ema=self.ema,
            optimizer=self.optimizer,
            recipe=StepRecipe.of(self.resolved.settings),
            autocast=torch.bfloat16 if self.dtype == torch.bfloat16 else None,
            parallel=TrainerProcesses(self),
        )
        return step

    def _find_checkpoint(self) -> tuple[dict[str, Any], Path] | None:
        found = None
        if self.context.is_main:
            found = run_state.load_latest(self.run_dir, self.log)
        path = distributed.broadcast_object(self.context, None if found is None else str(found[1]))
        if path is None:
            return None
        state = found[0] if found is not None else run_state.read_checkpoint(Path(path))
        stored = state["identity"]
        problems = differences(stored, self.record()["identity"])
        if problems:
            raise ConfigurationError(f"{path} belongs to another run ({'; '.join(problems)})")
        self.log(
            f"{'would resume' if self.dry_run else 'resuming'} from {path} (step {state['step']})"
        )
        return state, Path(path)

    def _wrap(self, model: nn.Module, ema: nn.Module) -> tuple[nn.Module, nn.Module]:
        if not self.context.is_distributed:
            return model, ema
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for module in (model, ema, *self.posthoc.modules):
                for block in module.blocks:
                    fully_shard(block)
                fully_shard(module)
            return model, ema
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        # gradients are views of DDP's reduction buckets (zeroed in place after each step, see
        # TrainerProcesses): no copy between .grad and the buckets, no second gradient in memory
        wrapped = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        return wrapped, ema

    def _load_optimizer(self, optim_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            optim_state,
            options=StateDictOptions(full_state_dict=True),
        )

    # -- 3. loop ------------------------------------------------------------------------------

    def _train(self) -> TrainResult:
        from selfflow.train.watch import Watch

        started = time.perf_counter()
        step = self._build()
        settings = self.resolved.settings
        end = settings.steps
        if step >= end:
            self.log(f"{self.run_dir} is already at step {step} of {end}; nothing to do")
            export = run_state.export_path(self.run_dir, step)  # written with that checkpoint
            export = export if export.is_file() else None
            return TrainResult(step, self.last_checkpoint, export, 0.0, {}, self.context.rank)
        self.log(self._describe(step))
        watch = Watch(self, step)
        # each shard's sha256 checked once per run (a resume skips what the run folder records
        # as verified and unchanged), in the background, before a row of it is read
        _, order = run_streams(self.resolved, self.dataset)
        g, context = self.resolved.settings.global_batch_size, self.context
        record = ShardRecord(self.run_dir, self.dataset, context.rank, context.world_size, self.log)
        self.dataset.start_verifying(order.indices(step * g, len(self.dataset)), record)
        prefetch = self.prefetch = Prefetcher(self._make_batches, step, end)
        reader = SummaryReader()
        self.metrics: dict[str, float] = {}
        try:
            with _SignalFlag() as flag:
                while step < end:
                    with compile_errors():  # compilation happens in the first step
                        summary = self.step(prefetch.get(step), stop=flag.raised)
                    step += 1
                    self.posthoc.update(self.model, step)
                    reader.push(step, summary)
                    # the previous step's numbers, read while this one runs on the device
                    stop = self._read(reader, watch, keep=1)
                    saving = stop or step % settings.checkpoint_every == 0 or step == end
                    if not (saving or self.posthoc.due(step, end) or watch.due(step, end)):
                        continue
                    # nothing is kept before every step up to here was read and was finite
                    stop = self._read(reader, watch, keep=0) or stop
                    self.posthoc.snapshot_if_due(self, step, end)  # before the checkpoint
                    if stop or saving:
                        began = time.perf_counter()
                        self.save(step)
                        seconds = time.perf_counter() - began
                        if self.context.is_main:  # what a checkpoint costs, beside the rates
                            watch.log_record({"step": step, "seconds": seconds}, "checkpoint")
                    if not stop:  # a stopping run spends its grace period on the checkpoint
                        watch.periodic(step, end)
                    if stop:
                        raise StoppedBySignal(
                            f"stopped by {signal.Signals(flag.signum or signal.SIGTERM).name} "
                            f"after step {step}; checkpoint {self.last_checkpoint} written. "
                            f"Rerun the same command to continue",
                            flag.signum or signal.SIGTERM,
                        )
        finally:
            prefetch.close()
            self.dataset.stop_verifying()
            watch.close()
        return TrainResult(
            step,
            self.last_checkpoint,
            self.last_export,
            time.perf_counter() - started,
            self.metrics,
            self.context.rank,
        )

    def _dry_run(self) -> TrainResult:
        """``--dry-run``: every check a start makes (the newest checkpoint's CRC-32s and settings
        included), then the plan; nothing written, no model built."""
        found = self._find_checkpoint()
        step = int(found[0]["step"]) if found is not None else 0
        if found is None and self.init_state is None and self.config.init_from:
            # every checkpoint damaged: the start falls back to --init-from, so check it too
            self.init_state = read_init(self.resolved, self.config.init_from)
        self.log("plan: " + self._describe(step))
        here = torch.cuda.is_available()  # a login node may lack the job's GPUs: say so
        if not here and self.context.device.type == "cuda":
            self.log("no CUDA here: the device, precision and compilation above are the job's")
        elif not here and self.config.device is None:
            self.log("no CUDA here and no --device: planned for the CPU (--device cuda: GPUs)")
        lines, failures = run_state.plan_lines(
            self.run_dir,
            self.resolved.settings,
            step=step,
            images=len(self.dataset),
            num_parameters=self.num_parameters,
            init_from=None if found or self.init_state is None else self.config.init_from,
        )
        lines += run_cost_lines(self)  # FLOPs per image and memory per GPU at the data's shape
        for line in lines:
            self.log(line)
        failures += verify_report(self.dataset, progress=self.config.progress, log=self.log)
        if failures:  # the last line says what failed; the exit status is 1
            raise ConfigurationError("the dry run failed: " + "; ".join(failures))
        self.log("dry run: every check passed and nothing was written")
        checkpoint = found[1] if found is not None else None
        return TrainResult(step, checkpoint, None, 0.0, {}, self.context.rank)

    def _read(self, reader: SummaryReader, watch: Any, *, keep: int) -> bool:
        """Read step summaries until ``keep`` remain: log them (the newest in ``self.metrics``)
        and stop at a non-finite one. Returns whether any process asked to stop."""
        stop = False
        while len(reader) > keep:
            step, values = reader.pop()
            loss, norm = values["loss"], values["grad_norm"]
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise NonFiniteLossError(
                    f"the loss is {loss} (flow {values['flow']}, rep {values['rep']}) with "
                    f"gradient norm {norm} at step {step}; nothing from it was saved. Return to "
                    f"{self.last_checkpoint or 'the start (no checkpoint yet)'} (rerunning "
                    f"resumes from it) and lower --lr, or check the data"
                )
            stop = stop or values.pop("stop") > 0
            self.metrics = values
            watch.after_step(step, values)
        return stop

    def _describe(self, step: int) -> str:
        r, s = self.resolved, self.resolved.settings
        m = r.model
        params = self.num_parameters
        return (
            f"training {s.model} ({m.hidden_size}/{m.depth}/{m.num_heads}, {params / 1e6:.2f} M "
            f"parameters) on {m.in_channels}×{m.input_size}×{m.input_size} data, "
            f"{m.num_classes} classes{self._data_classes()}, method {s.method} (mask ratio "
            f"{s.mask_ratio}, rep weight {s.rep_weight}, layers {s.student_layer}→{s.teacher_layer}), from step {step} to "
            f"{s.steps}; global batch {s.global_batch_size} = {self.context.world_size} "
            f"process(es) × {r.accumulation} micro-batch(es) × {s.batch_size}; "
            f"{str(self.dtype).removeprefix('torch.')} on {self.context.device}, "
            f"{s.network} network{self._compiled()}" + (" with FSDP" if self.sharded else "")
        )

    def _compiled(self) -> str:
        """Whether the fast network runs compiled, for the run's first line (a slow run on a GPU
        should say it is eager)."""
        if self.config.network != "fast":
            return ""
        return " (compiled)" if compiles(self.config.compile, self.context.device) else " (eager)"

    def _data_classes(self) -> str:
        data = self.dataset.num_classes
        return "" if data == self.resolved.model.num_classes else f" (the data has {data})"

    def _make_batches(self, step: int) -> list[MicroBatch]:
        """This process's micro-batches of step ``step`` (runs on the prefetch thread)."""
        if not hasattr(self, "_order"):
            self._spec, self._order = run_streams(self.resolved, self.dataset)
        share = process_range(self._spec.global_batch, self.context.rank, self.context.world_size)
        mine = draw_step(self._spec, self._order, step, rows=share)  # this process's rows only
        null = self.resolved.model.null_class  # the label table's last row
        batches = [
            materialise(part, self.dataset, null)
            for part in micro_batches(mine, self.resolved.settings.batch_size)
        ]
        if self.context.device.type == "cuda":
            batches = [_pinned(b) for b in batches]
        return batches

    # -- checkpoints --------------------------------------------------------------------------

    def full_states(
        self, ema_only: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Full CPU state dicts of model, EMA and optimiser on rank 0 (a collective under FSDP)."""
        return run_state.full_state_dicts(
            self.model,
            self.ema,
            self.optimizer,
            sharded=self.sharded,
            is_main=self.context.is_main,
            ema_only=ema_only,
        )

    def save(self, step: int) -> None:
        """Checkpoint and EMA export of ``step`` (rank 0 writes), then prune; all ranks wait."""
        from selfflow.train.export import write_export

        model, ema, optimizer = self.full_states()
        posthoc = self.posthoc.checkpoint_entry(self)  # None without --posthoc-ema
        if self.context.is_main:
            # the export first: a checkpoint is then never without its export, even when the
            # disk fills up between the two (a rerun resumes from the checkpoint and would not
            # write the export of that step again)
            self.last_export = write_export(
                self.resolved.model, ema, run_state.export_path(self.run_dir, step), self.card
            )
            self.last_checkpoint = run_state.write_checkpoint(
                self.run_dir,
                step,
                model=model,
                ema=ema,
                optimizer=optimizer,
                identity=self.resolved.identity(),
                dataset=self.dataset.identity,
                settings=self.resolved.to_dict(),
                images_seen=step * self.resolved.settings.global_batch_size,
                card=self.card.to_dict(),
                posthoc_ema=posthoc,
            )
            s = self.resolved.settings
            run_state.prune(self.run_dir, s.keep_last, s.keep_every)
        self.last_checkpoint = Path(
            distributed.broadcast_object(self.context, str(self.last_checkpoint))
        )
        distributed.barrier(self.context)


def _pinned(batch: MicroBatch) -> MicroBatch:
    return MicroBatch(
        batch.x0.pin_memory(),
        batch.y.pin_memory(),
        batch.noise.pin_memory(),
        batch.tau.pin_memory(),
        batch.tau_teacher.pin_memory(),
    )
