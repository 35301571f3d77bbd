"""Reading the launch environment: torchrun's variables, SLURM's, SLURM's host lists."""

from __future__ import annotations

import pytest
import torch

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.launch import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    Launch,
    expand_hostlist,
    launch_environment,
    slurm_default_port,
)

SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[003-004,010],login7",
    "SLURM_JOB_ID": "412345",
    "SLURM_STEP_ID": "0",  # srun's tasks have it; the batch script does not
}


# -- host lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("localhost", ["localhost"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("gpu5", ["gpu5"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the padding of the lower bound
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("a,b,c", ["a", "b", "c"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("x[1,3]y[7]z", ["x1y7z", "x3y7z"]),
        ("cn[5]", ["cn5"]),
        ("node-a.cluster,node[2-3].cluster", ["node-a.cluster", "node2.cluster", "node3.cluster"]),
    ],
)
def test_slurm_host_lists_expand_as_slurm_writes_them(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text, reason",
    [
        ("node[01-03", "not closed"),
        ("node]1[", "do not pair"),
        ("node[a-b]", "not a number"),
        ("node[3-1]", "backwards"),
        ("a,,b", "empty entry"),
        ("node[[1]]", "do not pair"),
    ],
)
def test_a_host_list_slurm_would_not_write_is_refused_by_name(text, reason):
    with pytest.raises(ConfigurationError, match=reason) as caught:
        expand_hostlist(text, "SLURM_JOB_NODELIST")
    assert "SLURM_JOB_NODELIST" in str(caught.value) and repr(text) in str(caught.value)


# -- the environment -------------------------------------------------------------------------


def test_no_launcher_is_one_process():
    assert launch_environment({}) == Launch()
    assert launch_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == Launch()  # salloc


def test_a_command_in_the_batch_script_itself_is_one_process():
    """The batch step has SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_ID: it is
    not rank 0 of the job's tasks (which would wait for 7 others that never come)."""
    batch = {name: value for name, value in SLURM.items() if name != "SLURM_STEP_ID"}
    assert launch_environment({**batch, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) == Launch()


def test_srun_tasks_read_their_place_from_slurm():
    launch = launch_environment(SLURM)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "slurm", 5, 8, 1,
    )  # fmt: skip
    assert launch.master_addr == "gpu003"
    # every task of the job computes the same port, inside the documented range
    assert launch.master_port == slurm_default_port("412345", "0")
    assert SLURM_PORT_BASE <= launch.master_port < SLURM_PORT_BASE + SLURM_PORT_SPAN
    other_tasks = [launch_environment({**SLURM, "SLURM_PROCID": str(r)}) for r in range(8)]
    assert {(t.master_addr, t.master_port) for t in other_tasks} == {("gpu003", launch.master_port)}
    assert [t.rank for t in other_tasks] == list(range(8))


def test_ports_differ_between_jobs_and_steps():
    ports = {slurm_default_port(str(job)) for job in range(1000, 1100)}
    assert len(ports) > 90  # nearly all distinct
    assert slurm_default_port("7", "0") != slurm_default_port("7", "1")


def test_the_step_wins_over_the_job_and_master_variables_win_over_both():
    step = {**SLURM, "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_NODELIST": "gpu[004,010]"}  # fmt: skip
    launch = launch_environment(step)
    assert (launch.world_size, launch.master_addr) == (4, "gpu004")
    launch = launch_environment({**SLURM, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29511"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.9", 29511)


def test_torchrun_variables_win_over_slurm():
    """``srun torchrun``: SLURM's task is torchrun's agent; its workers carry torchrun's view."""
    torchrun = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu003"}
    launch = launch_environment({**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", **torchrun})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "torchrun", 3, 16, 3,
    )  # fmt: skip
    assert launch.master_addr == "gpu003" and launch.master_port is None


def test_one_srun_task_needs_no_address():
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "3"}
    launch = launch_environment(one)
    assert (launch.launcher, launch.world_size, launch.master_addr) == ("slurm", 1, None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_PROCID": "8"}, "inconsistent SLURM variables: SLURM_PROCID=8, SLURM_NTASKS=8"),
        ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS must be an integer; got 'eight'"),
        ({"SLURM_LOCALID": None}, "found SLURM_PROCID but not ['SLURM_LOCALID']"),
        ({"SLURM_NTASKS": None}, "found SLURM_PROCID but not ['SLURM_NTASKS']"),
        ({"SLURM_JOB_NODELIST": None}, "set MASTER_ADDR"),
        ({"SLURM_JOB_ID": None}, "set MASTER_PORT"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port (1 to 65535); got '70000'"),
        ({"SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM_JOB_NODELIST 'gpu[1-' is not a SLURM host"),
    ],
)
def test_a_broken_slurm_environment_is_one_clear_error(change, message):
    environ = {**SLURM, **change}
    environ = {name: value for name, value in environ.items() if value is not None}
    with pytest.raises(ConfigurationError) as caught:
        launch_environment(environ)
    assert message in str(caught.value)


# -- what the process-group set-up and the dry run make of it -------------------------------


def _only(monkeypatch, variables: dict[str, str]) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *SLURM,
                 "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_NODELIST"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_the_dry_run_plans_for_the_slurm_job(monkeypatch):
    _only(monkeypatch, SLURM)
    context = distributed.planning_context("cpu")
    assert (context.rank, context.world_size, context.local_rank) == (5, 8, 1)
    assert not context.is_distributed
    # on a login node: the job's task count alone, no node list or job id to meet at
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    monkeypatch.delenv("SLURM_JOB_ID")
    context = distributed.planning_context("cpu")
    assert (context.rank, context.world_size) == (5, 8)
    with pytest.raises(ConfigurationError, match="set MASTER_ADDR"):  # a real start needs it
        distributed.setup("cpu")


def test_one_srun_task_sets_up_as_one_process(monkeypatch):
    _only(monkeypatch, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                        "SLURM_STEP_ID": "0"})  # fmt: skip
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.is_distributed) == (0, 1, False)
    assert context.device == torch.device("cpu")


def test_a_task_that_sees_one_gpu_takes_it_whatever_its_local_id(monkeypatch):
    """``srun --gpus-per-task=1``: each task sees only its own GPU, as cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed._gpu_slot(launch_environment(SLURM)) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # every GPU of the node shown
    assert distributed._gpu_slot(launch_environment(SLURM)) == 1
    # torchrun's workers see the node's GPUs: LOCAL_RANK, never a silent cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torchrun = launch_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert distributed._gpu_slot(torchrun) == 1


@pytest.mark.parametrize(
    "variables, says",
    [
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"},
            True,
        ),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"},
            False,
        ),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),
        ({}, True),
    ],
)
def test_only_the_first_process_reports_a_stop_by_signal(monkeypatch, capsys, variables, says):
    """Every task of a job step gets the SIGTERM; its one-line report comes from rank 0."""
    import signal
    from types import SimpleNamespace

    from selfflow.train import cli, trainer

    def stopped(*args, **kwargs):
        raise trainer.StoppedBySignal("stopped by SIGTERM after step 7", signal.SIGTERM)

    _only(monkeypatch, variables)
    monkeypatch.setattr(trainer, "train", stopped)
    monkeypatch.setattr(cli, "config_from_args", lambda args: None)
    assert cli.run(SimpleNamespace(dry_run=False)) == 128 + signal.SIGTERM
    assert ("stopped by SIGTERM after step 7" in capsys.readouterr().out) is says
