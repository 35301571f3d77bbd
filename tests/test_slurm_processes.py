"""``srun`` without torchrun, without SLURM: two local processes given only SLURM's variables
train and sample exactly as two processes given torchrun's variables do (gloo on the CPU).

Both pairs are started the same way (no agent, see tests/batch/two_ranks.py), so the only
difference is how each process learns its place: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``, or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/
``SLURM_JOB_NODELIST``/``SLURM_JOB_ID``/``SLURM_STEP_ID`` (the port derived from the job and
step ids).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfflow.base.launch import slurm_default_port
from tests.batch.test_sample import sample_args
from tests.train.helpers import (
    REPO,
    assert_states_equal,
    cli_args,
    final_state,
    logged_steps,
    make_dataset,
    subprocess_env,
    tiny_config,
)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def torchrun_style(rank: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(torchrun_style.port)}  # fmt: skip


def slurm_style(host: str):
    """SLURM's variables for a job whose derived port is free here (no MASTER_* at all)."""
    job = next(j for j in range(900001, 901000) if _free(slurm_default_port(str(j), "0")))

    def env(rank: int) -> dict[str, str]:
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                "SLURM_JOB_NODELIST": host, "SLURM_JOB_ID": str(job),
                "SLURM_STEP_ID": "0"}  # fmt: skip

    return env


def run_pair(command: list[str], env_of_rank, logs: Path, timeout: float = 240) -> list[str]:
    """Start ranks 0 and 1 of ``command`` with ``env_of_rank(rank)`` (and no other launch
    variable); both must succeed. Returns their outputs."""
    if env_of_rank is torchrun_style:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            torchrun_style.port = probe.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in (0, 1):
        env = {k: v for k, v in subprocess_env().items() if k not in LAUNCH_VARIABLES}
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        env.update(env_of_rank(rank))
        log = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        processes.append(
            (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        )
    try:
        codes = [process.wait(timeout=timeout) for process, _ in processes]
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
            log.close()
    outputs = [(logs / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    return outputs


@pytest.mark.slow  # 50 s on 2 shared CPU cores: four Python processes start and import torch
def test_srun_tasks_train_exactly_as_torchrun_processes(tmp_path):
    data = make_dataset(tmp_path / "data", n=16)
    runs = {}
    for name, env_of_rank in (("torchrun", torchrun_style), ("slurm", slurm_style("localhost"))):
        out = tmp_path / name
        config = tiny_config(data, out, steps=2, checkpoint_every=2)
        command = [sys.executable, str(REPO / "train.py"), *cli_args(config)]
        outputs = run_pair(command, env_of_rank, tmp_path / f"{name}-logs")
        assert "2 process(es) × 1 micro-batch(es) × 4" in outputs[0], outputs[0][-2000:]
        runs[name] = out
    a, b = final_state(runs["torchrun"]), final_state(runs["slurm"])
    assert a["step"] == b["step"] == 2
    assert_states_equal(a, b)
    assert logged_steps(runs["torchrun"]).keys() == logged_steps(runs["slurm"]).keys() == {1, 2}
    for step, record in logged_steps(runs["torchrun"]).items():
        assert logged_steps(runs["slurm"])[step]["loss"] == record["loss"]


@pytest.mark.slow  # 75 s on 2 shared CPU cores
def test_srun_tasks_sample_the_same_npz_bytes_as_torchrun_processes(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    npz = {}
    for name, env_of_rank in (("torchrun", torchrun_style), ("slurm", slurm_style("127.0.0.1"))):
        out = tmp_path / name
        args = sample_args(tiny_checkpoint, tiny_vae_dir, out, n=6, batch=2, steps=2, shard=2)
        command = [sys.executable, str(REPO / "tests" / "batch" / "two_ranks.py"), "plain", *args]
        outputs = run_pair(command, env_of_rank, tmp_path / f"{name}-logs")
        assert "on 2 processes" in outputs[0], outputs[0][-2000:]
        npz[name] = (out / "samples_6.npz").read_bytes()
    assert npz["torchrun"] == npz["slurm"]
