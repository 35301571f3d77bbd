"""The dry run and the start against a short disk and missing or truncated shards (issue 23,
item 5): a failed check ends the dry run with status 1 and the failure as its last line; a start
refuses a missing or truncated shard before it writes anything into the run folder."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from selfflow import cli
from selfflow.base.errors import DatasetError
from selfflow.data import write_dataset
from selfflow.train.trainer import train

from .helpers import cli_args, tiny_config

SHARD = "shard_00002.npy"


def four_shards(folder: Path) -> Path:
    """40 images in four shards of 10."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((40, 4, 8, 8)).astype(np.float32)
    stds = np.full_like(means, 0.3)
    return write_dataset(folder, means, np.arange(40) % 10, stds=stds, shard_size=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return four_shards(tmp_path_factory.mktemp("data") / "ds")


def copy_with(data: Path, folder: Path, damage: str) -> Path:
    """A copy of ``data`` whose shard 2 is ``missing``, ``truncated`` or has one bit
    ``flipped``."""
    shutil.copytree(data, folder)
    shard = folder / "shards" / SHARD
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-640])  # half of the last image's std
    else:
        content = bytearray(shard.read_bytes())
        content[-3] ^= 0x10  # one bit of the last image's std
        shard.write_bytes(bytes(content))
    return folder


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """Exit status and every line the command printed, stdout and stderr in their order."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(argv)
    return status, out.getvalue().strip().splitlines()


def test_the_dry_run_fails_when_the_disk_cannot_hold_the_checkpoints_the_run_keeps(
    tmp_path, data, mounts
):
    config = tiny_config(data, tmp_path / "disk" / "run", steps=4, checkpoint_every=1)
    # what one checkpoint and its export really take on disk, measured on a finished run
    train(tiny_config(data, tmp_path / "measured", steps=1, checkpoint_every=1))
    one = sum(p.stat().st_size for p in (tmp_path / "measured").rglob("*.pt"))
    # room for one checkpoint (a start's own check passes) but not for the three kept
    mounts.mount("disk", int(2.2 * one) // 4096 * 4096)
    status, lines = run_cli(["train", *cli_args(config), "--dry-run"])
    assert status == 1
    assert lines[-1].startswith("selfflow train: error: the dry run failed: not enough free")
    assert "3 kept checkpoints" in lines[-1] and "every check passed" not in "\n".join(lines)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_the_dry_run_fails_naming_a_missing_or_truncated_shard(tmp_path, data, damage):
    bad = copy_with(data, tmp_path / "ds", damage)
    config = tiny_config(bad, tmp_path / "run")
    status, lines = run_cli(["train", *cli_args(config), "--dry-run"])
    assert status == 1
    assert lines[-1].startswith("selfflow train: error:") and f"{SHARD} is {damage}" in lines[-1]
    assert not (tmp_path / "run").exists()
    intact_status, intact = run_cli(["train", *cli_args(tiny_config(data, tmp_path / "ok")),
                                     "--dry-run"])  # fmt: skip
    assert intact_status == 0 and intact[-1].endswith("every check passed and nothing was written")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_start_refuses_a_missing_or_truncated_shard_before_writing_anything(
    tmp_path, data, damage
):
    bad = copy_with(data, tmp_path / "ds", damage)
    with pytest.raises(DatasetError, match=f"{SHARD} is {damage}"):
        train(tiny_config(bad, tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DatasetError, match=SHARD):
        train(tiny_config(bad, existing))
    assert list(existing.iterdir()) == []  # no run.json, tensorboard/, log.jsonl, lock
