"""SIGTERM (a scheduler's preemption, ``timeout``) ends `sample` as Ctrl-C does: exit 143, a
line that says to rerun, the folder lock removed, and a rerun that continues."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_checkpoint, tiny_vae_dir):
    out = tmp_path / "samples"
    command = [
        sys.executable, str(REPO / "sample.py"), "--ckpt", str(tiny_checkpoint),
        "--vae", str(tiny_vae_dir), "--output-dir", str(out), "--num-fid-samples", "400",
        "--batch-size", "4", "--num-steps", "4", "--shard-size", "8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    shards = out / "shards"
    deadline = time.monotonic() + 240
    while not (shards.is_dir() and any(p.name.startswith("shard_") for p in shards.iterdir())):
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (out / ".lock").exists()  # the run holds its folder
    victim.send_signal(signal.SIGTERM)
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode == 143, stderr.decode()[-2000:]
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("sample.py: terminated (SIGTERM)")
    assert "rerun the same command to continue" in last
    assert not (out / ".lock").exists()
    assert not (out / "samples_400.npz").exists()
    finished = [p for p in shards.iterdir() if p.name.startswith("shard_")]
    assert 0 < len(finished) < 50

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = re.search(r"shards of 8: \d+ shards? \((\d+) images?\) done", rerun.stdout)
    done_before = int(resumed.group(1))
    assert done_before >= 8 * len(finished) - 8  # it continued, it did not start over
