"""The sbatch scripts of scripts/slurm/ and the commands docs/cluster.md shows, without SLURM.

Each script is read by ``bash -n``, then run by bash as sbatch would run it, with stand-ins
for ``srun``, ``scontrol``, ``torchrun`` and ``selfflow`` on the PATH that record their
command lines: bash itself substitutes the variables (from a plausible job's environment),
and every ``selfflow`` command line that results is parsed by the CLI's own parser (through
torchrun's parser for the ``srun torchrun`` variant). Whether the job is requeued after the
step's exit status is checked the same way. What is not checked here: a real SLURM.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from selfflow.base.launch import launch_environment
from selfflow.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"
DOC = REPO / "docs" / "cluster.md"
NAMES = ["prepare.sbatch", "sample.sbatch", "train.sbatch", "train_torchrun.sbatch"]
SEP = "\x1f"

STUB = """#!/bin/bash
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\\x1f%s' "$a"; done; printf '\\n'; } \\
    >> "$STUB_LOG"
for name in RANK WORLD_SIZE LOCAL_RANK SLURM_PROCID SLURM_NTASKS SLURM_LOCALID; do
    [[ -v $name ]] && printf '%s=%s\x1f' "$name" "${!name}"
done >> "$STUB_LOG.env"
printf '\n' >> "$STUB_LOG.env"
case "$(basename "$0") $1" in
    "scontrol show") printf 'gpu001\\ngpu002\\n' ;;
    "srun "*) exit "${STUB_STATUS:-0}" ;;
esac
"""


def run_script(tmp_path: Path, name: str, status: int = 0, **env: str) -> list[list[str]]:
    """Run ``name`` as a 2-node job would; returns the recorded command lines."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol", "torchrun", "selfflow"):
        (stubs / tool).write_text(STUB)
        (stubs / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    Path(f"{log}.env").unlink(missing_ok=True)
    job = {
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "USER": "ada",
        "STUB_LOG": str(log),
        "STUB_STATUS": str(status),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_CPUS_PER_TASK": "8",
        **env,
    }
    done = subprocess.run(
        ["bash", str(SCRIPTS / name)], env=job, capture_output=True, text=True, timeout=60
    )
    expected = 0 if env.get("DRY_RUN") else status
    assert done.returncode == expected, done.stderr
    return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []


def selfflow_argv(call: list[str]) -> list[str]:
    """The ``selfflow`` arguments (after the subcommand's program) of a recorded call."""
    tool, *args = call
    if tool == "srun":
        while args and args[0].startswith("-"):  # srun's own options, all --name=value here
            assert "=" in args[0], f"srun option {args[0]!r} without its value: {call}"
            args.pop(0)
        tool, *args = args
    if tool == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(args)
        assert launch.module and launch.training_script == "selfflow.cli", call
        return list(launch.training_script_args)
    assert tool == "selfflow", call
    return args


def parse(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"selfflow's parser refuses: {shlex.join(argv)}")


@pytest.mark.parametrize("name", NAMES)
def test_every_script_is_valid_bash(name):
    done = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_every_script_asks_for_the_signal_and_the_requeue_it_relies_on(name):
    lines = (SCRIPTS / name).read_text().splitlines()
    directives = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
    # TERM without B: goes to every task of every step (the shell is left alone, so it can
    # requeue); with B: only the batch shell would get it
    assert {"--signal=TERM@120", "--requeue", "--open-mode=append"} <= directives
    first = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first:])  # sbatch stops reading


@pytest.mark.parametrize("name", NAMES)
def test_the_job_step_is_a_selfflow_command_its_parser_accepts(tmp_path, name):
    calls = run_script(tmp_path, name, SHARED="/lustre/ada")
    steps = [call for call in calls if call[0] == "srun"]
    assert len(steps) == 1, calls
    args = parse(selfflow_argv(steps[0]))
    assert args.command == name.split(".")[0].split("_")[0]
    assert args.device == "cuda"
    # the folders the job writes are on the shared filesystem, and so are the caches
    folder = args.output_dir if hasattr(args, "output_dir") else args.out_dir
    assert str(folder).startswith("/lustre/ada/")
    if name.startswith("train"):
        assert str(args.data).startswith("/lustre/ada/") and args.model == "XL/2"
    if name == "train_torchrun.sbatch":
        launch = steps[0][steps[0].index("torchrun") + 1 :]
        assert "--rdzv-endpoint=gpu001:29500" in launch and "--nnodes=2" in launch
        assert "--ntasks-per-node=1" in (SCRIPTS / name).read_text()
    else:  # one task per GPU: selfflow reads SLURM's variables itself
        assert steps[0][1:3] == ["--kill-on-bad-exit=1", "selfflow"]


@pytest.mark.parametrize("name", ["train.sbatch", "train_torchrun.sbatch"])
def test_the_dry_run_mode_checks_the_jobs_own_command_on_the_login_node(tmp_path, name):
    job = run_script(tmp_path, name, SHARED="/lustre/ada")
    step = selfflow_argv(next(call for call in job if call[0] == "srun"))
    # on a login node: no SLURM job, no srun, no scontrol
    dry = run_script(tmp_path, name, SHARED="/lustre/ada", DRY_RUN="1",
                     SLURM_JOB_ID="", SLURM_NNODES="", SLURM_JOB_NODELIST="")  # fmt: skip
    assert [call[0] for call in dry] == ["selfflow"]
    assert dry[0][1:] == [*step, "--dry-run"]
    assert parse(dry[0][1:]).dry_run
    # ... planned for the job's 8 processes (one node of 8 GPUs, the scripts' default)
    line = (tmp_path / "calls.log.env").read_text().splitlines()[0]
    variables = dict(item.split("=", 1) for item in line.split(SEP) if item)
    place = launch_environment(variables, rendezvous=False)
    assert (place.rank, place.world_size) == (0, 8), variables


@pytest.mark.parametrize("name", ["prepare.sbatch", "sample.sbatch", "train.sbatch"])
def test_a_step_stopped_by_sigterm_requeues_the_job_and_nothing_else_does(tmp_path, name):
    """selfflow's commands exit with 143 (128 + SIGTERM) once their work is kept."""
    for status, requeued in ((143, True), (0, False), (1, False)):
        calls = run_script(tmp_path, name, status=status)
        assert (["scontrol", "requeue", "4242"] in calls) is requeued, (status, calls)


def test_the_torchrun_variant_requeues_after_a_failure_a_bounded_number_of_times(tmp_path):
    for status, restarts, requeued in ((1, "0", True), (1, "19", True), (1, "20", False),
                                       (0, "0", False)):  # fmt: skip
        calls = run_script(
            tmp_path, "train_torchrun.sbatch", status=status, SLURM_RESTART_COUNT=restarts
        )
        assert (["scontrol", "requeue", "4242"] in calls) is requeued, (status, restarts)


# -- docs/cluster.md --------------------------------------------------------------------------


def doc_commands() -> list[str]:
    """The command lines of docs/cluster.md's bash blocks (comments and blank lines left out,
    continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_every_command_the_cluster_page_shows_is_checked():
    """A script run (each one is run above), an ``export`` of the scripts' own variables, or
    a ``selfflow`` command that its parser accepts."""
    commands = doc_commands()
    assert len(commands) >= 6
    script_text = "\n".join((SCRIPTS / name).read_text() for name in NAMES)
    for command in commands:
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words[0] in ("sbatch", "bash"):
            assert words[-1].removeprefix("scripts/slurm/") in NAMES, command
            assert all(re.fullmatch(r"--[a-z-]+=\S+", w) for w in words[1:-1]), command
        elif words[0] == "export":
            assert words[1].split("=")[0] in script_text, command
        elif words[0] == "selfflow":
            parse(words[1:])
        else:
            pytest.fail(f"docs/cluster.md shows a command no test checks: {command}")
