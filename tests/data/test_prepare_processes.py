"""`selfflow prepare` as users run it: a command, torchrun with two processes, a SIGKILL.

Every run here is a subprocess with the same thread settings (OMP_NUM_THREADS=1), the same
--batch-size and --shard-size, so "the same bytes" is a fair demand: each image's posterior is
computed in the same batch whichever process computes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.trees import files_in, write_tree

HERE = Path(__file__).resolve().parent


def env() -> dict[str, str]:
    variables = dict(os.environ)
    variables["OMP_NUM_THREADS"] = "1"
    return variables


def prepare_args(tree: Path, out: Path, vae: str) -> list[str]:
    return [
        str(tree), str(out), "--vae", vae, "--image-size", "16", "--shard-size", "4",
        "--batch-size", "2", "--num-workers", "1",
    ]  # fmt: skip


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "train", per_class=8)


@pytest.fixture(scope="module")
def reference(tree, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "latents"
    done = run(
        [sys.executable, "-m", "selfflow.cli", "prepare", *prepare_args(tree, out, tiny_vae_dir)]
    )
    assert "24 images" in done.stdout and "on 1 process" in done.stdout
    assert "img/s" in done.stderr  # the progress bar shows the rate
    return out


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_the_same_files(reference, tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "latents"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "selfflow.cli", "prepare", *prepare_args(tree, out, tiny_vae_dir),
    ]  # fmt: skip
    done = run(command)
    assert "on 2 processes" in done.stdout
    assert "24/24" in done.stderr  # rank 0's bar counts both ranks' images
    assert files_in(out) == files_in(reference)


@pytest.mark.slow
def test_two_processes_resume_what_one_left_and_redo_a_damaged_shard(
    reference, tree, tiny_vae_dir, tmp_path
):
    """The finished shards are checked by both ranks (split between them), a damaged one and
    the missing ones are encoded again, and the files end up those of one uninterrupted run."""
    out = tmp_path / "latents"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "labels.npy").unlink()
    for shard in (1, 4):
        (out / "shards" / f"shard_{shard:05d}.npy").unlink()
    damaged = out / "shards" / "shard_00002.npy"
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "selfflow.cli", "prepare", *prepare_args(tree, out, tiny_vae_dir),
    ]  # fmt: skip
    done = run(command)
    assert "3 damaged or unfinished shards will be redone" in done.stderr
    assert "(3 of 6 already done)" in done.stderr
    assert files_in(out) == files_in(reference)


@pytest.mark.slow
def test_sigkill_half_way_then_the_same_command_gives_the_same_files(
    reference, tree, tiny_vae_dir, tmp_path
):
    out = tmp_path / "latents"
    command = [
        sys.executable,
        str(HERE / "slow_prepare.py"),
        "0.4",
        *prepare_args(tree, out, tiny_vae_dir),
    ]
    log = tmp_path / "victim.log"
    with open(log, "w") as handle:
        victim = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + 240
        while len(list((out / "shards").glob("*.json"))) < 2 if (out / "shards").is_dir() else True:
            assert victim.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
    finished = len(list((out / "shards").glob("*.json")))
    assert 2 <= finished < 6, "the run was not interrupted half way"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    done = run(
        [sys.executable, "-m", "selfflow.cli", "prepare", *prepare_args(tree, out, tiny_vae_dir)]
    )
    assert f"({finished} of 6 already done)" in done.stderr  # it continued, it did not start over
    assert files_in(out) == files_in(reference)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_decoding_workers_end_with_a_killed_prepare(tiny_vae_dir, tmp_path):
    """SIGKILL gives the process no chance to stop its workers: they must notice by themselves.
    The images are large enough that decoded batches fill the pipe to the dead parent, which
    kept the workers alive indefinitely before."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / name / f"{i:02d}.png")
    out = tmp_path / "latents"
    command = [
        sys.executable, str(HERE / "slow_prepare.py"), "0.4", str(tmp_path / "tree"), str(out),
        "--vae", tiny_vae_dir, "--image-size", "64", "--shard-size", "8", "--batch-size", "8",
        "--num-workers", "2", "--no-progress",
    ]  # fmt: skip
    victim = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("shards/*.json")):  # the workers have decoded ahead by now
            assert victim.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = _children(victim.pid)
        assert len(workers) == 2
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()
        while any(map(_running, workers)) and time.monotonic() - killed < 3:
            time.sleep(0.05)
        assert not any(map(_running, workers)), "decoding workers outlived their parent by 3 s"
    finally:
        victim.kill()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
