"""How a command leaves the process group (:func:`selfflow.base.distributed.session`).

A finished command meets its peers once more before it leaves: the gloo worker that ran the
last object collective must get the GIL back before the interpreter shuts down, or C++ aborts
the process after all its work was done (exit -6, "terminate called without an active
exception"; it happened to rank 1 of a training run whose last step ended in a validation).
A command that failed does not wait for that meeting, and the peer that finished does not
hang or fail because of it: it exits 0 and the failed process reports the failure.

Two local processes with torchrun's variables and no agent (as tests/batch/two_ranks.py), so
nothing but the processes themselves ends either of them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.test_slurm_processes import LAUNCH_VARIABLES, torchrun_style
from tests.train.helpers import subprocess_env

SCRIPT = """
import sys
from selfflow.base import distributed
from selfflow.base.errors import SelfFlowError

mode = sys.argv[1]
with distributed.session("cpu") as context:
    for k in range(3):  # object collectives, the last one right before leaving
        found = distributed.all_gather_objects(context, [context.rank] * 1000)
        assert [part[0] for part in found] == [0, 1]
    if mode == "error" and context.rank == 1:
        raise SelfFlowError("rank 1 failed on purpose")
print(f"rank {context.rank} done", flush=True)
"""


def _pair(tmp_path: Path, mode: str) -> tuple[list[int], list[str], float]:
    script = tmp_path / "session.py"
    script.write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        torchrun_style.port = probe.getsockname()[1]
    processes = []
    began = time.perf_counter()
    for rank in (0, 1):
        env = {k: v for k, v in subprocess_env().items() if k not in LAUNCH_VARIABLES}
        env.update(torchrun_style(rank))
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), mode],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        )
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [p.returncode for p in processes], outputs, time.perf_counter() - began


def test_finished_processes_leave_together_and_cleanly(tmp_path):
    codes, outputs, _ = _pair(tmp_path, "ok")
    assert codes == [0, 0], outputs
    assert ["rank 0 done" in outputs[0], "rank 1 done" in outputs[1]] == [True, True]
    assert not any("terminate called" in output for output in outputs)


def test_a_failed_process_does_not_hold_back_the_one_that_finished(tmp_path):
    codes, outputs, seconds = _pair(tmp_path, "error")
    assert codes == [0, 1], outputs
    assert "rank 0 done" in outputs[0] and "rank 1 failed on purpose" in outputs[1]
    assert seconds < 60  # the process group's timeout is 2 h: rank 0 saw rank 1 leave
