"""How this process was started: by torchrun, by SLURM's ``srun``, or by hand (one process).

The one place that reads the launch environment; :mod:`selfflow.base.distributed` builds the
process group from what it returns, for sampling, training, ``prepare`` and the dry run alike.

- **torchrun** (``python -m torch.distributed.run``, also ``srun torchrun`` with one task per
  node) gives each worker ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT``. When any of the first three is present, torchrun's variables are used and
  SLURM's are ignored: under ``srun torchrun`` the task that SLURM started is torchrun's
  agent, not a worker, so SLURM's task numbers do not describe the workers.
- **srun alone** (one task per GPU) sets no torchrun variable; each task then takes its rank
  from ``SLURM_PROCID``, the process count from ``SLURM_STEP_NUM_TASKS`` (else
  ``SLURM_NTASKS``), its place on the node from ``SLURM_LOCALID``, and the rendezvous address
  from the first host of the step's node list (``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``): task 0 runs there under SLURM's block and cyclic distributions.
  ``MASTER_ADDR`` and ``MASTER_PORT`` win when set; without ``MASTER_PORT`` every task derives
  the same port from the job (and step) id, so no task has to tell the others.
  ``SLURM_STEP_ID`` marks a task that ``srun`` started: the batch script itself also has
  ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, but no step id (SLURM leaves it out for
  the batch and interactive steps), and a command typed there is one process, not rank 0 of
  tasks that will never come.
- Neither: one process, no process group.

SLURM writes node lists in a compressed form (``node[01-03,07],gpu5``); :func:`expand_hostlist`
reads it here, so ``scontrol show hostnames`` is not needed on the compute node.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from selfflow.base.errors import ConfigurationError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Ports derived from the job id: below Linux's ephemeral range (32768 and up), where the
# operating system picks the local ports of outgoing connections, and above the common
# service ports.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class Launch:
    """This process's place as its launcher describes it.

    ``launcher`` is ``"torchrun"``, ``"slurm"`` or ``""`` (started by hand: one process).
    ``master_addr`` and ``master_port`` say where rank 0 waits for the others (None when there
    is nobody to wait for, or, under torchrun, when its variables lack them).
    """

    launcher: str = ""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def launch_environment(
    environ: Mapping[str, str] | None = None, *, rendezvous: bool = True
) -> Launch:
    """This process's :class:`Launch`, from torchrun's variables, else SLURM's, else none.

    ``rendezvous=False`` reads the place alone, for code that joins no process group (the dry
    run, the rank-0-only report of a stop): no node list or job id is needed then.
    """
    environ = os.environ if environ is None else environ
    place = torchrun_environment(environ)
    if place is not None:
        port = environ.get("MASTER_PORT")
        return Launch(
            "torchrun",
            *place,
            master_addr=environ.get("MASTER_ADDR"),
            master_port=_port(port, "MASTER_PORT") if port else None,
        )
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return slurm_environment(environ, rendezvous=rendezvous)
    return Launch()


def torchrun_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None outside torchrun."""
    environ = os.environ if environ is None else environ
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


def slurm_environment(environ: Mapping[str, str], *, rendezvous: bool = True) -> Launch:
    """The place of a task that ``srun`` started (see the module docstring)."""
    count = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    missing = [name for name in (count, "SLURM_LOCALID") if name not in environ]
    if missing:
        raise ConfigurationError(
            f"found SLURM_PROCID but not {missing}; start one task per GPU with srun (which "
            f"sets them), or one task per node running torchrun"
        )
    rank = _integer(environ, "SLURM_PROCID")
    world = _integer(environ, count)
    local = _integer(environ, "SLURM_LOCALID")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigurationError(
            f"inconsistent SLURM variables: SLURM_PROCID={rank}, {count}={world}, "
            f"SLURM_LOCALID={local}"
        )
    if world == 1 or not rendezvous:
        return Launch("slurm", rank, world, local)
    return Launch(
        "slurm",
        rank,
        world,
        local,
        master_addr=_slurm_address(environ),
        master_port=_slurm_port(environ),
    )


def _slurm_address(environ: Mapping[str, str]) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return expand_hostlist(environ[name], name)[0]
    raise ConfigurationError(
        "SLURM gives no node list (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST) to find rank 0's "
        "host in; set MASTER_ADDR to the host of task 0"
    )


def _slurm_port(environ: Mapping[str, str]) -> int:
    if environ.get("MASTER_PORT"):
        return _port(environ["MASTER_PORT"], "MASTER_PORT")
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job:
        raise ConfigurationError(
            "SLURM gives no SLURM_JOB_ID to derive the rendezvous port from; set MASTER_PORT "
            "(the same on every task)"
        )
    return slurm_default_port(job, environ.get("SLURM_STEP_ID"))


def slurm_default_port(job_id: str, step_id: str | None = None) -> int:
    """The rendezvous port every task of a job step computes alike, without talking.

    Keyed by the step too, so that two steps of one job running side by side (or one after
    the other, while the last one's socket lingers) do not meet on the same port.
    """
    key = f"{job_id}.{step_id or ''}".encode()
    return SLURM_PORT_BASE + zlib.crc32(key) % SLURM_PORT_SPAN


def expand_hostlist(text: str, name: str = "host list") -> list[str]:
    """The host names of SLURM's compressed list, in order.

    ``node[01-03,07],gpu5`` is ``node01 node02 node03 node07 gpu5``: commas outside brackets
    separate entries, a bracket holds numbers and ranges (a range keeps its lower bound's
    zero padding), and an entry with several bracket groups (``r[1-2]n[1-2]``) is every
    combination, the first group varying slowest.
    """
    hosts: list[str] = []
    for entry in _split_entries(text, name):
        hosts.extend(_expand_entry(entry, text, name))
    return hosts


def _split_entries(text: str, name: str) -> list[str]:
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise _bad_hostlist(text, name, "brackets do not pair up")
    if depth:
        raise _bad_hostlist(text, name, "a bracket is not closed")
    entries.append(text[start:])
    if any(not entry.strip() for entry in entries):
        raise _bad_hostlist(text, name, "an empty entry")
    return [entry.strip() for entry in entries]


def _expand_entry(entry: str, text: str, name: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", entry)
    if match is None:
        if "[" in entry or "]" in entry:
            raise _bad_hostlist(text, name, f"cannot read {entry!r}")
        return [entry]
    prefix, numbers, rest = match.groups()
    tails = _expand_entry(rest, text, name) if rest else [""]
    return [prefix + number + tail for number in _numbers(numbers, text, name) for tail in tails]


def _numbers(body: str, text: str, name: str) -> list[str]:
    found: list[str] = []
    for part in body.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise _bad_hostlist(text, name, f"[{body}] holds {part!r}, not a number or a range")
        if not dash:
            found.append(low)
            continue
        if int(high) < int(low):
            raise _bad_hostlist(text, name, f"the range {part!r} runs backwards")
        found.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return found


def _bad_hostlist(text: str, name: str, reason: str) -> ConfigurationError:
    return ConfigurationError(
        f"{name} {text!r} is not a SLURM host list such as node[01-03,07],gpu5: {reason}"
    )


def _integer(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer; got {environ[name]!r}") from None


def _port(value: str, name: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigurationError(f"{name} must be a TCP port (1 to 65535); got {value!r}")
    return port
