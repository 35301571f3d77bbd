"""A busy folder names the command that holds it, once (issue 23, item 11).

Each test starts a second run while a real first run of that command holds the folder: the
second one is started from the first one's log callback, which runs while its lock is held.
"""

from __future__ import annotations

import os
import socket

from selfflow import cli
from selfflow.base.lock import FolderLock, lock_holder
from selfflow.batch import BatchConfig, generate_fid_batch
from selfflow.train.trainer import train
from tests.train.helpers import cli_args, make_dataset, tiny_config


def second_run_line(args: list[str], capsys) -> str:
    """The last stderr line of ``selfflow ARGS`` run now; it must fail."""
    capsys.readouterr()
    assert cli.main(args) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def expected_start(folder, command: str) -> str:
    return (
        f"{folder} is in use by `{command}` (pid {os.getpid()} on {socket.gethostname()}, started "
    )


def test_a_second_train_names_the_running_train_once(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    config = tiny_config(data, run, steps=1, checkpoint_every=1)
    seen: list[str] = []

    def log(message: str) -> None:
        if message.startswith("training") and not seen:  # the first run holds the folder now
            seen.append(lock_holder(run))
            seen.append(second_run_line(["train", *cli_args(config)], capsys))

    train(config, log=log)
    holder, line = seen
    assert holder.startswith(f"`selfflow train` (pid {os.getpid()} on ")
    assert line.startswith("selfflow train: error: " + expected_start(run, "selfflow train"))
    assert line.endswith("; wait for it to end or stop it, or choose another --output-dir")
    assert line.count("in use") == 1 and "sample" not in line


def test_a_second_sample_names_the_running_sample_once(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    config = BatchConfig(
        checkpoint=tiny_checkpoint, vae=tiny_vae_dir, output_dir=out, num_samples=2,
        batch_size=2, num_steps=2,
    )  # fmt: skip
    args = [
        "sample", "--ckpt", tiny_checkpoint, "--vae", tiny_vae_dir, "--output-dir", str(out),
        "--num-fid-samples", "2", "--batch-size", "2", "--num-steps", "2",
    ]  # fmt: skip
    seen: list[str] = []

    def log(message: str) -> None:
        if not seen and (out / ".lock").exists():
            seen.append(second_run_line(args, capsys))

    generate_fid_batch(config, progress=False, log=log)
    (line,) = seen
    assert line.startswith("selfflow sample: error: " + expected_start(out, "selfflow sample"))
    assert line.endswith("; wait for it to end or stop it, or choose another --output-dir")
    assert line.count("in use") == 1


def test_a_lock_written_by_an_older_selfflow_is_still_named(tmp_path):
    import fcntl

    (tmp_path / ".lock").write_text("4242 on elsewhere\n")
    with open(tmp_path / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert lock_holder(tmp_path) == "another selfflow process (pid 4242 on elsewhere)"


def test_train_refuses_a_folder_that_prepare_holds(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    run.mkdir()
    with FolderLock(run, "selfflow prepare", "OUT_DIR"):
        line = second_run_line(["train", *cli_args(tiny_config(data, run))], capsys)
    assert expected_start(run, "selfflow prepare") in line
    assert line.endswith("or choose another --output-dir")
