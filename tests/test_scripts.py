"""The scripts around the package: gpu_check.sh (no CUDA, budget, signals, ignored output),
train_gpu_check.sh (no CUDA, a CPU dry run of every stage), the bench's device error,
evaluator.py from a checkout, eval_speed.py's help, pr_tensorflow.py from any folder."""

from __future__ import annotations

import json
import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CPU_DRY_RUN = {
    "CPU_DRY_RUN": "1",
    "BENCH_ARGS": "--tiny --device cpu",
    "E2E_ARGS": "--tiny --device cpu --num-steps 4",
    "EVAL_ARGS": "--device cpu",
    "OMP_NUM_THREADS": "1",
}


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA")
def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OUT": str(out)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check.sh: error:")
    assert "no CUDA device" in proc.stderr and "CPU_DRY_RUN=1" in proc.stderr
    assert not out.exists()  # it did not start anything


def _processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (a unique temporary path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_gpu_check_ends_its_runs_when_killed(tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "log", "w")  # noqa: SIM115 (closed below)
    try:
        script = subprocess.Popen(
            ["bash", str(SCRIPT)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **CPU_DRY_RUN, "OUT": str(out), "BUDGET": "400"},
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not _processes_naming(f"{out}/throughput.json"):  # the first run has begun
            assert script.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=60) == 143
    finally:
        log.close()
    deadline = time.monotonic() + 30  # a killed run may take a moment to exit on a busy CPU
    while _processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_naming(str(out)) == []  # no run outlives the script
    assert "stopped by a signal" in (tmp_path / "log").read_text()


@pytest.mark.slow
def test_gpu_check_honours_its_budget(tmp_path):
    out = tmp_path / "out"
    began = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=200,
        env={**os.environ, **CPU_DRY_RUN, "OUT": str(out), "BUDGET": "12"},
    )  # fmt: skip
    # every run is cut at the budget's end (10 s more for timeout's --kill-after at most)
    assert time.monotonic() - began < 12 + 10 + 15, proc.stdout[-2000:]
    assert _processes_naming(str(out)) == []


def test_gpu_check_output_folder_is_ignored_by_git():
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "gpu_check_out/throughput.log"], cwd=REPO, timeout=60
    )
    assert proc.returncode == 0


TRAIN_SCRIPT = REPO / "benchmarks" / "train_gpu_check.sh"


@pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA")
def test_train_gpu_check_stops_at_once_without_cuda(tmp_path):
    proc = subprocess.run(
        ["bash", str(TRAIN_SCRIPT)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout and "ALLOW_CPU=1" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nvidia-smi.txt"]


@pytest.mark.slow
def test_train_gpu_check_dry_run_writes_every_figure(tmp_path):
    """The training GPU check's one shot, rehearsed on the CPU with a tiny model: each stage
    runs and leaves the files a GPU session is read from."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(TRAIN_SCRIPT)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "ALLOW_CPU": "1",
             "BENCH_ARGS": "--tiny --device cpu --batches 4 8", "LOOP_ARGS": "--steps 20"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    train = json.loads((out / "train.json").read_text())
    assert train["failures"] == {}
    assert [(r["path"], r["batch"]) for r in train["rows"]] == [
        (path, batch) for batch in (4, 8) for path in ("straightforward", "fast")
    ]
    assert set(train["compare"]) == {"reference", "straightforward", "fast"}
    profile = (out / "train_profile.txt").read_text()
    assert "## straightforward, batch 4" in profile and "## fast, batch 4" in profile
    variants = json.loads((out / "variants.json").read_text())
    assert {r["path"] for r in variants["rows"]} == {"fast-eager", "fast-float32"}
    loop = json.loads((out / "loop.json").read_text())
    assert loop["ratio"] > 0 and len(loop["checkpoint_s"]) == 1 and loop["data_wait"]
    assert "=== summary" in proc.stdout and "loop / bare" in proc.stdout


def test_script_headers_carry_no_internal_words():
    for path in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "benchmarks").glob("*.sh"),
                 REPO / "sample.py", REPO / "evaluator.py",
                 REPO / "src" / "selfflow" / "batch" / "bench.py"]:  # fmt: skip
        header = path.read_text()[:3000].lower()
        for word in (r"\bissues?\b", r"\blent\b"):
            assert not re.search(word, header), f"{path.name}: {word!r}"


@pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA")
def test_bench_without_cuda_is_one_clear_line():
    proc = subprocess.run(
        [sys.executable, "-m", "selfflow.batch.bench", "--device", "cuda"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr
    assert lines[0].startswith("python -m selfflow.batch.bench: error:")


@pytest.mark.parametrize("script", ["evaluator.py", "sample.py"])
def test_root_scripts_run_from_a_checkout_that_is_not_installed(script):
    """site-packages without their .pth files: torch and numpy import, an installed selfflow
    does not, so the script must find src/ itself."""
    paths = site.getsitepackages()
    code = (
        f"import sys, runpy; sys.path += {paths!r}; "
        f"sys.argv = [{script!r}, '--help']; "
        f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
        cwd=str(REPO.parent), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script} ")


def test_eval_speed_help_prints_each_default_once():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in ("--batches", "--samples", "--reference", "--threads", "--device"):
        part = text.split(option, 2)[-1].split(" --", 1)[0]
        assert part.count("default") == 1, (option, part)


def test_pr_tensorflow_runs_from_anywhere(tmp_path):
    # It imports the tests' TF side and reference from the checkout, whatever the cwd.
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pr_tensorflow.py"),
         "--n", "200", "--seeds", "1", "--cases", "pool3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pool3 | 0 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 10
    worst = re.search(
        r"pool3: selfflow and TF's float16 kernels differ by at most ([\d.]+)", proc.stdout
    )
    assert worst and 0 <= float(worst.group(1)) <= 0.05
