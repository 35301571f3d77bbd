"""Process-group set-up and work assignment, for torchrun and for SLURM's ``srun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU and tells each
its place through ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``srun`` with one task per GPU tells it through ``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID`` and the job's node list. :mod:`selfflow.base.launch` reads either (torchrun's
win); one node or many work the same way. Without them the program is a single process and
no process group is created.

NCCL is used when the processes run on CUDA devices, gloo on CPUs. The helpers below are thin
wrappers that do the right thing for a single process too, so callers never branch on it.

Two helpers guard multi-node runs. :func:`check_shared_folder` proves at set-up that every
process sees the files rank 0 writes (the batch is exchanged through the output folder).
:func:`wait_for_all` is the end-of-work barrier; it runs on a gloo group, whose TCP connections
report a process that died (crash, OOM kill, SIGKILL) within seconds, where an NCCL barrier
would wait out the process-group timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from selfflow.base.errors import ConfigurationError, SelfFlowError
from selfflow.base.files import replaced_atomically
from selfflow.base.launch import Launch, launch_environment
from selfflow.base.launch import torchrun_environment as torchrun_environment  # its old home

T = TypeVar("T")

# Long enough for rank 0 to download the checkpoint and check a folder of shards while the
# other processes wait in a collective.
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)
SHARED_CHECK_PREFIX = ".shared-check-"
# How long a process looks for rank 0's check file before it concludes that it cannot see it
# (a generous allowance for a network filesystem's caches; a new name is normally seen at once).
SHARED_CHECK_WAIT = 10.0


class PeerLostError(SelfFlowError):
    """Another process stopped (crashed or was killed) while this one waited for it."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group
    # gloo group for wait_for_all (None: the default group, when that is gloo already)
    control_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The network precision: as given, else bfloat16 on CUDA and float32 elsewhere.

    One rule for sampling (bf16 takes the fast path) and training (bf16 autocast, with float32
    weights, optimiser and EMA): on CPUs bf16 matmuls are slow and float32 keeps resumes
    bit-exact.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigurationError(f"dtype must be float32, bfloat16 or float16; got {dtype}")
    return dtype


def resolve_device(
    spec: str | None, local_rank: int = 0, world_size: int = 1, *, here: bool = True
) -> torch.device:
    """The device this process samples on.

    ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``"cuda"`` without
    an index also means ``cuda:LOCAL_RANK``, so one command line serves every process. With
    several processes an explicit index other than ``LOCAL_RANK`` is refused: torchrun passes
    the same command line to every process, so ``--device cuda:1`` would put them all on GPU 1.
    ``here=False`` resolves a CUDA device for another machine: its presence is not checked.
    """
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ConfigurationError(
            f"--device must be a torch device such as cpu, cuda or cuda:1; got {spec!r}"
        ) from error
    if device.type == "cuda" and world_size > 1 and device.index not in (None, local_rank):
        raise ConfigurationError(
            f"--device {spec} under torchrun with WORLD_SIZE={world_size} would put every "
            f"process on GPU {device.index} (this one has LOCAL_RANK={local_rank}); pass "
            f"--device cuda and each process takes cuda:LOCAL_RANK"
        )
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index
        if here:  # planned for another machine (here=False): not checked on this one
            _check_cuda_device(spec, index)
        device = torch.device("cuda", index)
    return device


def planning_context(device: str | None = None) -> DistributedContext:
    """This process's place as its launcher describes it, without a process group or a device.

    For checks that plan a run on another machine (``selfflow train --dry-run`` on a login node
    that lacks the job's GPUs): the world size and rank are the job's, ``--device cuda`` is
    taken as given (``here=False``: not checked), and every collective is a no-op (no backend),
    so rank 0 can check alone while the other ranks do nothing.
    """
    launch = launch_environment(rendezvous=False)
    rank, world, local = launch.rank, launch.world_size, launch.local_rank
    resolved = resolve_device(device, local, world, here=False)
    return DistributedContext(rank=rank, world_size=world, local_rank=local, device=resolved)


def _gpu_slot(launch: Launch) -> int:
    """The CUDA index ``--device cuda`` means for this process: its local rank, except for an
    ``srun`` task that sees a single GPU (``--gpus-per-task=1`` binds one GPU to each task,
    which is then ``cuda:0`` in every task, whatever its ``SLURM_LOCALID``)."""
    if launch.launcher == "slurm" and torch.cuda.is_available() and torch.cuda.device_count() == 1:
        return 0
    return launch.local_rank


def _check_cuda_device(spec: str, index: int) -> None:
    """This machine has CUDA and a device ``index``."""
    if not torch.cuda.is_available():
        raise ConfigurationError(
            f"--device {spec} asks for CUDA, but this PyTorch build or machine has no CUDA "
            f"device (torch {torch.__version__}); use --device cpu"
        )
    if index >= torch.cuda.device_count():
        raise ConfigurationError(
            f"device cuda:{index} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA devices"
        )


def setup(
    device: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistributedContext:
    """Join the process group that torchrun or srun describes (or none) and pick this
    process's device.

    A CUDA device becomes the process's current device (``torch.cuda.set_device``) and stays
    so after :func:`teardown`: a caller in a notebook that passes ``cuda:1`` then finds plain
    ``"cuda"`` tensors on GPU 1 too.
    """
    launch = launch_environment()
    rank, world, local = launch.rank, launch.world_size, launch.local_rank
    resolved = resolve_device(device, _gpu_slot(launch), world)
    if resolved.type == "cuda":
        # the current device is where un-placed CUDA work goes (streams, events, compiled
        # graphs); --device cuda:1 in one process must not leave it on GPU 0
        torch.cuda.set_device(resolved)
    if not launch.launcher:
        return DistributedContext(device=resolved)
    if world == 1:
        return DistributedContext(rank=rank, world_size=1, local_rank=local, device=resolved)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if launch.launcher == "torchrun" and missing:
        raise ConfigurationError(
            f"WORLD_SIZE={world} but {missing} are not set; start the processes with torchrun"
        )
    import torch.distributed as dist

    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = resolved
        if launch.launcher == "slurm":  # torchrun's workers meet through its agent (env://)
            host = (
                f"[{launch.master_addr}]" if ":" in str(launch.master_addr) else launch.master_addr
            )
            kwargs.update(
                init_method=f"tcp://{host}:{launch.master_port}", rank=rank, world_size=world
            )
        dist.init_process_group(**kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return DistributedContext(
        rank=rank,
        world_size=world,
        local_rank=local,
        device=resolved,
        backend=backend,
        control_group=control,
    )


def teardown(context: DistributedContext, *, finished: bool = False) -> None:
    """Leave the process group; ``finished``: every process got here by the same path (no
    error), so they can meet once more first.

    That last meeting is what lets a process exit cleanly after an object collective
    (``all_gather_object``, ``broadcast_object_list``, ``gather_object``). Gloo's worker thread
    drops its last hold on such a collective's tensors just after the caller has its result,
    and that needs the GIL; a process that then runs straight to the interpreter's shutdown
    (rank 1 of a run whose last step ends in a validation, ~1 run in 10 on a 2-core machine)
    shut that thread out of the GIL mid-destructor, and C++ aborted it: "terminate called
    without an active exception", exit code -6 after all the work was done. The barrier of
    :func:`wait_for_all` waits with the GIL released, so the worker finishes first. After an
    error there is no meeting: the others may never arrive.
    """
    if not context.is_distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if finished:
        with contextlib.suppress(PeerLostError):  # the process that ended says why itself
            wait_for_all(context, interval=0.01)
    dist.destroy_process_group()


@contextlib.contextmanager
def session(
    device: str | None = None, context: DistributedContext | None = None
) -> Iterator[DistributedContext]:
    """The process group of one command: ``context`` if the caller has one (and keeps it),
    else one joined by :func:`setup` and left by :func:`teardown` at the end."""
    if context is not None:
        yield context
        return
    context = setup(device)
    finished = False
    try:
        yield context
        finished = True
    finally:
        teardown(context, finished=finished)


def barrier(context: DistributedContext) -> None:
    """Wait for every process (the trainer's checkpoint and evaluation points).

    Unlike :func:`wait_for_all` it cannot tell a dead peer from a slow one; torchrun's own
    timeout ends a run whose peer died. NCCL is told this process's device, so that the barrier
    does not guess one.
    """
    if context.is_distributed:
        import torch.distributed as dist

        if context.backend == "nccl":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


def wait_for_all(
    context: DistributedContext,
    while_waiting: Callable[[], None] | None = None,
    interval: float = 0.5,
) -> None:
    """A barrier that fails with :class:`PeerLostError` if another process has died.

    ``while_waiting()`` is called every ``interval`` seconds until every process has arrived
    (rank 0 moves its progress bar with it).
    """
    if not context.is_distributed:
        return
    import torch.distributed as dist

    try:
        work = dist.barrier(group=context.control_group, async_op=True)
        while not work.is_completed():
            if while_waiting is not None:
                while_waiting()
            time.sleep(interval)
        work.wait()
    except RuntimeError as error:  # gloo: "Connection closed by peer", or the timeout
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeerLostError(
            f"rank {context.rank} lost another process while waiting for all to finish ({reason})"
        ) from error


def check_shared_folder(
    context: DistributedContext, folder: str | os.PathLike, wait: float | None = None
) -> None:
    """Fail on every process unless all of them can read a file rank 0 writes in ``folder``.

    The processes exchange their work through the output folder: rank 0 assembles the shards
    the others write. On several nodes without a shared filesystem rank 0 would wait for files
    that never come, so this is checked first. Rank 0 writes ``.shared-check-NONCE`` holding a
    random nonce and broadcasts the nonce; each process looks for the file (up to ``wait``
    seconds) and checks its content; the verdicts are gathered and the file is deleted.
    """
    if not context.is_distributed:
        return
    folder = Path(folder)
    wait = SHARED_CHECK_WAIT if wait is None else wait
    nonce = secrets.token_hex(16) if context.is_main else None
    if context.is_main:
        path = folder / f"{SHARED_CHECK_PREFIX}{nonce}"
        with replaced_atomically(path) as tmp:  # never seen half-written
            tmp.write_text(nonce)
    nonce = broadcast_object(context, nonce)
    path = folder / f"{SHARED_CHECK_PREFIX}{nonce}"
    deadline = time.monotonic() + wait
    while True:
        try:
            seen = path.read_text() == nonce
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    verdicts = all_gather_objects(context, (context.rank, socket.gethostname(), seen))
    if context.is_main:
        path.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in verdicts if not ok]
    if blind:
        writer = verdicts[0][1]
        raise ConfigurationError(
            f"--output-dir must be on a filesystem all nodes share: {', '.join(blind)} cannot "
            f"read {path}, which rank 0 on {writer} wrote (or the path names another folder "
            f"there); use a shared folder, given as an absolute path"
        )


def broadcast_object(context: DistributedContext, value: T, src: int = 0) -> T:
    """``value`` of rank ``src``, on every rank (a picklable object)."""
    if not context.is_distributed:
        return value
    import torch.distributed as dist

    box = [value if context.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather_objects(context: DistributedContext, value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.is_distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_objects(context: DistributedContext, value: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``value``, in rank order, on rank ``dst``; None on the other ranks.

    For results too big to copy to every process (the probe's features). It runs on the gloo
    control group when the default group is NCCL, so CPU objects never pass through GPU memory.
    """
    if not context.is_distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * context.world_size if context.rank == dst else None
    dist.gather_object(value, gathered, dst=dst, group=context.control_group)
    return gathered


def assign(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank``: item ``j`` goes to rank ``j % world_size``.

    Deterministic and computed alike by every process, so no coordination is needed; items
    that differ in cost by at most one unit leave the ranks at most one item apart.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigurationError(f"rank {rank} is not in a world of {world_size} processes")
    return list(items[rank::world_size])
