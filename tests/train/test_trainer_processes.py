"""The trainer as users run it: ``train.py`` under torchrun (gloo on CPUs), killed and rerun,
stopped by SIGTERM, and its export sampled by ``selfflow sample``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from selfflow.train import state as run_state
from selfflow.train.trainer import train

from .helpers import (
    REPO,
    assert_logs_close,
    assert_states_close,
    assert_states_equal,
    cli_args,
    final_state,
    folder_snapshot,
    make_dataset,
    subprocess_env,
    tiny_config,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    train(tiny_config(data, out, steps=4))
    return out


def torchrun(
    config, nproc: int, timeout: float = 300, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(REPO / "train.py"), *cli_args(config), *extra,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_a_dry_run_under_torchrun_plans_for_every_process_on_rank_zero(tmp_path, data, one_process):
    # no process group is joined (none of the ranks waits on another): rank 0 checks alone,
    # for the job's process count, and the other ranks only return
    before = folder_snapshot(one_process)
    for out, expect in ((tmp_path / "new" / "run", "a new run in"), (one_process, "at step 4 in")):
        done = torchrun(tiny_config(data, out, steps=6), nproc=2, extra=("--dry-run",))
        assert done.stdout.count("dry run: every check passed") == 1, done.stdout
        assert expect in done.stdout and "2 process(es) × 1 micro-batch(es) × 4" in done.stdout
    assert not (tmp_path / "new").exists() and folder_snapshot(one_process) == before
    # the job's FSDP is planned as such, though this process group is never joined
    done = torchrun(tiny_config(data, one_process, steps=6), 2, extra=("--dry-run", "--fsdp"))
    assert "with FSDP" in done.stdout and "shards nothing" not in done.stdout


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(tmp_path, data, one_process):
    out = tmp_path / "two"
    done = torchrun(tiny_config(data, out, steps=4), nproc=2)
    assert "2 process(es) × 1 micro-batch(es) × 4" in done.stdout
    assert_states_close(final_state(one_process), final_state(out))
    assert_logs_close(one_process, out)


@pytest.mark.slow
def test_two_processes_with_fsdp_train_the_same_weights_as_one(tmp_path, data, one_process):
    out = tmp_path / "fsdp"
    # two micro-batches per process: gradient sync only on the last (FSDP2's own switch)
    done = torchrun(tiny_config(data, out, steps=4, fsdp=True, batch_size=2), nproc=2)
    assert "with FSDP" in done.stdout and "2 process(es) × 2 micro-batch(es) × 2" in done.stdout
    assert_states_close(final_state(one_process), final_state(out))
    assert_logs_close(one_process, out)


@pytest.mark.slow
def test_the_flow_baseline_runs_under_ddp_with_its_projector_frozen(tmp_path, data):
    torchrun(tiny_config(data, tmp_path / "flow", steps=2, method="flow"), nproc=2)
    assert final_state(tmp_path / "flow")["step"] == 2


@pytest.mark.slow
def test_resuming_on_another_process_count_continues_the_same_run(tmp_path, data, one_process):
    out = tmp_path / "switch"
    # 2 processes × 2 micro-batches (DDP's no_sync), then 1 process × 4 micro-batches
    torchrun(tiny_config(data, out, steps=2, batch_size=2), nproc=2)
    result = train(tiny_config(data, out, steps=4, batch_size=2))
    assert result.step == 4
    assert_states_close(final_state(one_process), final_state(out))
    assert_logs_close(one_process, out)


def start(config, log: Path) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "train.py"), *cli_args(config)]
    return subprocess.Popen(
        command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=subprocess_env()
    )


def wait_for_checkpoint(process: subprocess.Popen, run: Path, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not run_state.list_checkpoints(run):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_the_same_command_gives_bit_identical_weights(tmp_path, data):
    steps = 40
    reference = tmp_path / "reference"
    train(tiny_config(data, reference, steps=steps, checkpoint_every=5, keep_last=1))
    victim = tmp_path / "victim"
    config = tiny_config(data, victim, steps=steps, checkpoint_every=5, keep_last=1)
    process = start(config, tmp_path / "victim.log")
    wait_for_checkpoint(process, victim, tmp_path / "victim.log")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    reached = run_state.list_checkpoints(victim)[-1][0]
    assert reached < steps, "the run finished before it was killed"
    rerun = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *cli_args(config)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    assert_states_equal(final_state(reference), final_state(victim))
    assert not list(victim.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_as_interrupted(tmp_path, data):
    steps = 400
    config = tiny_config(data, tmp_path / "run", steps=steps, checkpoint_every=1000)
    log = tmp_path / "run.log"
    process = start(config, log)
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "log.jsonl").is_file():  # training has begun
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "stopped by SIGTERM" in log.read_text()
    ((stopped, _),) = run_state.list_checkpoints(tmp_path / "run")
    assert 0 < stopped < steps


@pytest.mark.slow
def test_an_export_samples_through_selfflow_sample(tmp_path, tiny_vae_dir):
    # VAE-shaped latents (4 × 8 × 8, what the tiny VAE decodes to 16 × 16 RGB) and the
    # 1000 classes the FID batch draws from
    data = make_dataset(tmp_path / "latents", n=16, classes=1000)
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=2))
    export = run_state.export_path(run, 2)
    done = subprocess.run(
        [
            sys.executable, str(REPO / "sample.py"), "--ckpt", str(export), "--vae",
            tiny_vae_dir, "--output-dir", str(tmp_path / "samples"), "--num-fid-samples", "6",
            "--batch-size", "3", "--num-steps", "4",
        ],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "samples" / "samples_6.npz") as npz:
        assert npz["arr_0"].shape == (6, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
