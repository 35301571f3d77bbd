"""torchrun set-up and work assignment, from torchrun's environment variables alone.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU and tells each
its place through ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Nothing else is read, so one node or many work the same way. Without those variables the
program is a single process and no process group is created.

NCCL is used when the processes run on CUDA devices, gloo on CPUs. The helpers below are thin
wrappers that do the right thing for a single process too, so callers never branch on it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from selfflow.errors import ConfigurationError

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Long enough for rank 0 to download the checkpoint and check a folder of shards while the
# other processes wait in a collective.
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def torchrun_environment(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None outside torchrun."""
    environ = dict(os.environ if environ is None else environ)
    present = [name for name in _TORCHRUN_VARS if name in environ]
    if not present:
        return None
    missing = [name for name in _TORCHRUN_VARS if name not in environ]
    if missing:
        raise ConfigurationError(
            f"found the torchrun variables {present} but not {missing}; start the processes with "
            f"torchrun (python -m torch.distributed.run), which sets all of them"
        )
    try:
        rank, world, local = (int(environ[name]) for name in _TORCHRUN_VARS)
    except ValueError as error:
        raise ConfigurationError(
            f"torchrun variables must be integers; got "
            f"{ {name: environ[name] for name in _TORCHRUN_VARS} }"
        ) from error
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigurationError(
            f"inconsistent torchrun variables: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


def resolve_device(spec: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device this process samples on.

    ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``"cuda"`` without
    an index also means ``cuda:LOCAL_RANK``, so one command line serves every process. With
    several processes an explicit index other than ``LOCAL_RANK`` is refused: torchrun passes
    the same command line to every process, so ``--device cuda:1`` would put them all on GPU 1.
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
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"--device {spec} asks for CUDA, but this PyTorch build or machine has no CUDA "
                f"device (torch {torch.__version__}); use --device cpu"
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device cuda:{index} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA devices"
            )
        device = torch.device("cuda", index)
    return device


def setup(
    device: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistributedContext:
    """Join the process group that torchrun describes (or none) and pick this process's device."""
    place = torchrun_environment()
    if place is None:
        return DistributedContext(device=resolve_device(device, 0))
    rank, world, local = place
    resolved = resolve_device(device, local, world)
    if world == 1:
        return DistributedContext(rank=rank, world_size=1, local_rank=local, device=resolved)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigurationError(
            f"WORLD_SIZE={world} but {missing} are not set; start the processes with torchrun"
        )
    import torch.distributed as dist

    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = resolved
        dist.init_process_group(**kwargs)
    return DistributedContext(
        rank=rank, world_size=world, local_rank=local, device=resolved, backend=backend
    )


def teardown(context: DistributedContext) -> None:
    if context.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        import torch.distributed as dist

        if context.backend == "nccl":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


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


def assign(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank``: item ``j`` goes to rank ``j % world_size``.

    Deterministic and computed alike by every process, so no coordination is needed; items
    that differ in cost by at most one unit leave the ranks at most one item apart.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigurationError(f"rank {rank} is not in a world of {world_size} processes")
    return list(items[rank::world_size])
