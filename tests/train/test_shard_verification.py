"""Shards checked against the manifest's sha256 while training (issue 23, item 6): a damaged
shard is named before any step uses a row of it, the dry run names it, and intact data trains
exactly as without the check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.base.errors import DatasetError
from selfflow.data import LatentDataset
from selfflow.train.trainer import train

from .helpers import cli_args, log_records, tiny_config
from .test_dry_run_checks import SHARD, copy_with, four_shards, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return four_shards(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def verified_run(tmp_path_factory, data) -> tuple[Path, list]:
    """Two steps on intact data, with the verifiers the run started."""
    started = []
    original = LatentDataset.start_verifying

    def spy(self, indices=None, record=None):
        started.append(original(self, indices, record))
        return started[-1]

    run = tmp_path_factory.mktemp("verified") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LatentDataset, "start_verifying", spy)
        train(tiny_config(data, run, steps=2, checkpoint_every=1))
    return run, started


def test_the_dry_run_names_a_damaged_shard(tmp_path, data):
    bad = copy_with(data, tmp_path / "ds", "flipped")
    status, lines = run_cli(["train", *cli_args(tiny_config(bad, tmp_path / "run")), "--dry-run"])
    assert status == 1 and not (tmp_path / "run").exists()
    assert lines[-1].startswith("selfflow train: error: the dry run failed: 1 of the 4 shards")
    assert f"{SHARD} is damaged" in lines[-1]
    # the sha256 found, computed here independently, and the manifest's
    found = hashlib.sha256((bad / "shards" / SHARD).read_bytes()).hexdigest()
    expected = LatentDataset(data).manifest["shards"][2]["sha256"]
    assert found[:12] in lines[-1] and expected[:12] in lines[-1]
    status, lines = run_cli(["train", *cli_args(tiny_config(data, tmp_path / "ok")), "--dry-run"])
    assert status == 0 and any("the 4 shards" in line and "match the manifest's sha256" in line
                               for line in lines)  # fmt: skip


def test_a_flipped_byte_stops_training_before_any_step_uses_the_shard(tmp_path, data):
    bad = copy_with(data, tmp_path / "ds", "flipped")
    run = tmp_path / "run"
    # a global batch of the whole dataset: step 0 reads a row of every shard
    config = tiny_config(bad, run, global_batch_size=40, steps=2, checkpoint_every=1)
    with pytest.raises(DatasetError, match=f"{SHARD} is damaged") as caught:
        train(config)
    assert "the manifest says" in str(caught.value) and "write_dataset" in str(caught.value)
    assert not (run / "log.jsonl").exists() or log_records(run) == []  # no step was done
    assert not list(run.glob("checkpoints/*.pt"))


def test_verified_reads_name_a_damaged_shard_and_return_none_of_its_rows(tmp_path, data):
    bad = copy_with(data, tmp_path / "ds", "flipped")
    ds = LatentDataset(bad)
    verifier = ds.start_verifying(np.arange(40)[::-1])  # the last shards first
    try:
        with pytest.raises(DatasetError, match=f"{SHARD} is damaged"):
            ds.get_batch(np.array([25]))  # waits for (or makes) shard 2's check
        with pytest.raises(DatasetError, match=f"{SHARD} is damaged"):
            ds.get_batch(np.array([0]))  # once found, no read goes on
    finally:
        ds.stop_verifying()
    assert 2 not in verifier.good
    # a reader checks a shard itself when the background has not: stopped at once here
    intact = LatentDataset(data)
    verifier = intact.start_verifying()
    intact.stop_verifying()
    got = intact.get_batch(np.arange(40))
    assert verifier.good == {0, 1, 2, 3}
    assert torch.equal(got[0], LatentDataset(data).get_batch(np.arange(40))[0])


def test_intact_data_trains_exactly_as_without_verification(
    tmp_path, data, verified_run, monkeypatch
):
    run, started = verified_run
    assert len(started) == 1 and started[0].done and started[0].good == {0, 1, 2, 3}
    monkeypatch.setattr(LatentDataset, "start_verifying", lambda self, *args: None)
    train(tiny_config(data, tmp_path / "plain", steps=2, checkpoint_every=1))
    verified = [(r["step"], r["loss"], r["grad_norm"]) for r in log_records(run)]
    plain = [(r["step"], r["loss"], r["grad_norm"]) for r in log_records(tmp_path / "plain")]
    assert verified == plain and len(verified) == 2
