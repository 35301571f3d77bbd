"""A run verifies each shard once, not once per start (issue 23, item 6): the run folder records
the shards it verified, a resume hashes none of the unchanged ones again and trains exactly as
an unbroken run, a rewritten shard is hashed again (and refused if damaged), an unreadable record
is named and ignored, and the processes of a run share the hashing through their records."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from selfflow.base.errors import DatasetError
from selfflow.data import LatentDataset, verify
from selfflow.data.verify import ShardRecord, ShardVerifier, record_path
from selfflow.train.trainer import train

from .helpers import assert_states_equal, final_state, tiny_config
from .test_dry_run_checks import four_shards

SHARDS = [f"shard_{k:05d}.npy" for k in range(4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return four_shards(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture
def hashed(monkeypatch) -> list[tuple[str, str]]:
    """Every shard hashed from now on: (thread name, file name), in the order hashed."""
    calls: list[tuple[str, str]] = []
    real = verify.file_sha256

    def counted(path, *args, **kwargs):
        calls.append((threading.current_thread().name, Path(path).name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify, "file_sha256", counted)
    return calls


def names(calls: list[tuple[str, str]]) -> list[str]:
    return sorted(name for _, name in calls)


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def verify_once(data: Path, run: Path, rank: int = 0, world: int = 1, log=None) -> ShardVerifier:
    """Verify every shard of ``data`` with the record of ``run`` (as the trainer does), wait
    until all are checked, then stop (which writes the record)."""
    ds = LatentDataset(data)
    verifier = ds.start_verifying(None, ShardRecord(run, ds, rank, world, log))
    wait_until(lambda: verifier.done)
    ds.stop_verifying()
    return verifier


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-3] ^= 0x10  # one bit of the last image's std
    path.write_bytes(bytes(content))


@pytest.mark.slow  # three short training runs
def test_a_resume_hashes_no_shard_again_and_trains_as_an_unbroken_run(tmp_path, data, hashed):
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=2, checkpoint_every=1))
    assert names(hashed) == SHARDS  # the first start hashes each shard once
    recorded = json.loads(record_path(run, 0).read_text())["shards"]
    assert sorted(recorded) == SHARDS
    hashed.clear()
    lines: list[str] = []
    train(tiny_config(data, run, steps=4, checkpoint_every=1), log=lines.append)
    assert hashed == []  # the resume trusts what this run verified, the files being unchanged
    assert any("4 of the 4 shards were verified by an earlier start" in line for line in lines)
    # another run is another record: it hashes for itself, and trains to the same bits
    train(tiny_config(data, tmp_path / "unbroken", steps=4, checkpoint_every=1))
    assert names(hashed) == SHARDS
    assert_states_equal(final_state(run, 4), final_state(tmp_path / "unbroken", 4))
    # the dry run still hashes every shard, whatever the record says
    hashed.clear()
    train(tiny_config(data, run, steps=6), dry_run=True, log=lambda line: None)
    assert names(hashed) == SHARDS


@pytest.mark.slow  # three short training runs
def test_a_rewritten_shard_is_hashed_again_and_a_damaged_one_refused(tmp_path, data, hashed):
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    run = tmp_path / "run"
    # a global batch of the whole dataset: every step reads a row of every shard
    config = tiny_config(copy, run, steps=2, checkpoint_every=1, global_batch_size=40)
    train(config)
    # the same bytes written again (a new mtime): hashed again, found intact, trained on
    shard = copy / "shards" / SHARDS[1]
    shard.write_bytes(shard.read_bytes())
    hashed.clear()
    train(replace(config, steps=3))
    assert names(hashed) == [SHARDS[1]]
    assert final_state(run)["step"] == 3
    # one bit changed: hashed again and refused before any step uses it
    flip_a_byte(copy / "shards" / SHARDS[2])
    hashed.clear()
    with pytest.raises(DatasetError, match=f"{SHARDS[2]} is damaged"):
        train(replace(config, steps=4))
    assert names(hashed) == [SHARDS[2]]
    assert final_state(run)["step"] == 3  # no step after the damage was saved


def test_a_shard_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path, data, hashed):
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    run = tmp_path / "run"
    verify_once(copy, run)
    shard = copy / "shards" / SHARDS[2]
    before = shard.stat()
    time.sleep(0.02)  # past the file system's clock tick
    flip_a_byte(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    hashed.clear()
    ds = LatentDataset(copy)
    verifier = ds.start_verifying(None, ShardRecord(run, ds))
    try:
        with pytest.raises(DatasetError, match=f"{SHARDS[2]} is damaged"):
            ds.get_batch(np.arange(40))
        wait_until(lambda: verifier.done)
    finally:
        ds.stop_verifying()
    assert names(hashed) == [SHARDS[2]] and verifier.good == {0, 1, 3}


@pytest.mark.parametrize("damage", ["not json", "cut short", "an entry without its inode"])
def test_an_unreadable_record_is_named_in_one_line_and_ignored(tmp_path, data, hashed, damage):
    run = tmp_path / "run"
    verify_once(data, run)
    path = record_path(run, 0)
    text = path.read_text()
    if damage == "not json":
        path.write_text("verified: all of them\n")
    elif damage == "cut short":
        path.write_text(text[: len(text) // 2])
    else:
        body = json.loads(text)
        del body["shards"][SHARDS[1]]["inode"]
        path.write_text(json.dumps(body))
    hashed.clear()
    lines: list[str] = []
    verifier = verify_once(data, run, log=lines.append)
    assert names(hashed) == SHARDS and verifier.good == {0, 1, 2, 3}  # hashed as usual
    assert len(lines) == 1 and lines[0].startswith(f"note: ignoring {path} (")
    assert sorted(json.loads(path.read_text())["shards"]) == SHARDS  # written whole again


def test_a_record_that_disagrees_with_the_manifest_is_not_trusted(tmp_path, data, hashed):
    run = tmp_path / "run"
    verify_once(data, run)
    path = record_path(run, 0)
    body = json.loads(path.read_text())
    body["shards"][SHARDS[0]]["sha256"] = "0" * 64
    path.write_text(json.dumps(body))
    hashed.clear()
    verify_once(data, run)
    assert names(hashed) == [SHARDS[0]]
    # a record of the same dataset in another folder is not used at all
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    hashed.clear()
    verify_once(moved, run)
    assert names(hashed) == SHARDS


def test_two_processes_share_the_hashing_through_their_records(tmp_path, data, hashed, monkeypatch):
    run = tmp_path / "run"
    # shard order 0, 1, 2, 3: rank 0 hashes 0 and 2 first, rank 1 hashes 1 and 3 first
    published = record_path(run, 1)

    def rank_one_published() -> bool:
        try:
            return {SHARDS[1], SHARDS[3]} <= set(json.loads(published.read_text())["shards"])
        except (OSError, ValueError):
            return False

    real = verify.file_sha256

    def slow_rank_zero(path, *args, **kwargs):
        # rank 0 is still at its share when rank 1 has published its own
        if threading.current_thread().name == "selfflow-verify-0" and path.name == SHARDS[2]:
            wait_until(rank_one_published)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify, "file_sha256", slow_rank_zero)
    verifiers = []
    for rank in (0, 1):
        ds = LatentDataset(data)
        verifiers.append((ds, ds.start_verifying(None, ShardRecord(run, ds, rank, 2))))
    for ds, verifier in verifiers:
        wait_until(lambda verifier=verifier: verifier.done)
        ds.stop_verifying()
        assert verifier.good == {0, 1, 2, 3}
    zero = [name for thread, name in hashed if thread == "selfflow-verify-0"]
    one = [name for thread, name in hashed if thread == "selfflow-verify-1"]
    assert zero == [SHARDS[0], SHARDS[2]]  # shards 1 and 3 taken from rank 1's record
    assert {SHARDS[1], SHARDS[3]} <= set(one) and len(hashed) < 8
    # a resume of both processes hashes nothing: each reads its own record
    hashed.clear()
    for rank in (0, 1):
        verify_once(data, run, rank, 2)
    assert hashed == []
