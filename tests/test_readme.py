"""The README's set-up promises: how to get torch first, what [test] brings, how big the
environment is, how long the suite takes, and what the P/R agreement was measured against."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETUP = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]


def test_torch_is_installed_first_cpu_or_cuda():
    cpu = SETUP.index("download.pytorch.org/whl/cpu")
    package = SETUP.index("pip install -e .")
    assert cpu < package and SETUP.index("pip install torch\n") < package
    assert "CUDA" in SETUP


def test_the_test_extra_says_it_brings_tensorflow_for_the_parity_tests_only():
    assert re.search(r"\[test\].*tensorflow-cpu \(about 1\.3 GB\)", SETUP)
    assert "only there for the parity tests" in SETUP and "never imports it" in SETUP


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout"
)
def test_what_the_readme_creates_in_the_checkout_is_ignored_by_git():
    venvs = re.findall(r"python -m venv (\S+)", SETUP)  # the set-up's environment (.venv)
    demo = re.findall(r"python -m selfflow\.train\.demo --out (\S+)", README)
    assert venvs and demo
    for folder in venvs + demo:
        ignored = subprocess.run(  # the checkout's own rules, not this machine's global ones
            ["git", "-c", "core.excludesFile=/dev/null", "check-ignore", "-q", f"{folder}/x"],
            cwd=ROOT,
        )
        assert ignored.returncode == 0, f"{folder}/ is not in .gitignore"


def test_the_environment_size_is_stated():
    assert re.search(r"\*\*\d+\.\d+ GB\*\*.*\[test\]`?,\s*\*\*\d+\.\d+ GB\*\*", SETUP, re.S)


def test_the_suite_duration_is_measured_not_guessed():
    assert "about a minute" not in README
    assert re.search(r"python -m pytest -q +# [^\n]*\d+ min \d+ s on 2 \w+ CPU cores", README)


def test_precision_recall_agreement_says_what_it_was_measured_against(capsys):
    # The figures are the recorded run's, in the README and in evaluate --help.
    record = (ROOT / "benchmarks/results/2026-11-29-cpu/pr_tensorflow.md").read_text()
    worst = dict(
        re.findall(r"# (\w+): selfflow and TF's float16 kernels differ by at most ([\d.]+)", record)
    )
    pool3, offset = float(worst["pool3"]), float(worst["offset"])
    from selfflow.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    readme = " ".join(README.split())
    for where in (readme, text):
        assert re.search(r"TensorFlow's (own )?float16", where) and "pr_tensorflow.py" in where
        assert "ADM's own evaluator" not in where  # it cannot be fetched here, nor run
        figures = {float(x) for x in re.findall(r"(?:at most|up to) (0\.\d+)", where)}
        assert {pool3, offset} <= figures, (pool3, offset, figures)
    # the README's ranges against exact float64 (both float16 columns) and the run's size
    rows = re.findall(r"^\| (pool3|offset) \| \d+ \|(.*)\|$", record, re.M)
    assert len(rows) == 10 and "# x86_64" in record and "4000 + 4000 features" in record
    for case, digits in (("pool3", 4), ("offset", 4)):  # as the table prints them
        gaps = [float(x) for c, rest in rows if c == case for x in rest.split("|")[-2:]]
        low, high = round(min(gaps), digits), round(max(gaps), digits)
        assert f"{low:.{digits}f} to {high:.{digits}f} from exact" in readme, (case, low, high)
    assert "4000 + 4000 random features of width 2048, 5 seeds" in readme


def test_the_digits_demo_table_is_the_recorded_runs():
    section = README.split("### It learns real data on a CPU", 1)[1].split("\n### ", 1)[0]
    cited = re.findall(r"`(benchmarks/results/[^`]+/digits_demo\.log)`", section)
    assert len(cited) == 1, cited
    record = (ROOT / cited[0]).read_text()
    final = dict(
        ((method, int(step)), float(value))
        for method, step, value in re.findall(
            r"^\| (selfflow|flow) \| (\d+) \| ([\d.]+)%", record, re.M
        )
    )
    runs = [json.loads(line) for line in record.splitlines() if line.startswith("{")]
    seconds = {(run["method"], run["step"]): run["train_seconds"] for run in runs}
    rows = re.findall(
        r"^\| (\d+)[^|]* \| ([\d.]+) % \| ([^|]+) \| ([\d.]+) % \| ([^|]+) \|$", section, re.M
    )
    assert len(rows) >= 4 and {int(r[0]) for r in rows} == {s for _, s in final}, rows
    for step, ours, our_time, sit, sit_time in rows:
        step = int(step)
        assert float(ours) == final[("selfflow", step)] and float(sit) == final[("flow", step)]
        for method, shown in (("selfflow", our_time), ("flow", sit_time)):
            if step:
                figure = float(shown.strip().removesuffix(" s"))  # whole seconds, rounded
                assert abs(figure - seconds[(method, step)]) <= 0.5, (method, step, shown)
