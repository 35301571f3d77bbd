"""The background writer on its own: shard filling across batch boundaries, order, abort."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from selfflow.base.finite import NonFiniteSamplesError, check_rows
from selfflow.batch import store
from selfflow.batch.writer import ShardWriter

SHAPE = (2, 2, 3)


def fake_decode(latents: torch.Tensor) -> np.ndarray:
    """Image of sample i: every value equals the latent's first value (an index, here)."""
    values = latents.flatten(1)[:, 0].to(torch.uint8).numpy()
    return np.broadcast_to(values[:, None, None, None], (len(values), *SHAPE)).copy()


def latents_for(indices) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.float32)[:, None, None, None].expand(-1, 4, 2, 2)


def test_batches_crossing_shard_boundaries_fill_the_right_shards(tmp_path):
    plan = store.ShardPlan(11, 4)
    mine = [plan.shard(0), plan.shard(2)]  # samples 0-3 and 8-10, as rank 0 of 2 would get
    indices = np.concatenate([s.indices for s in mine])
    landed = []
    writer = ShardWriter(fake_decode, tmp_path, mine, SHAPE, 11, on_shard=landed.append).start()
    for start in range(0, len(indices), 3):  # batches 0-2, 3+8+9, 10
        batch = indices[start : start + 3]
        writer.submit(batch, batch + 100, latents_for(batch))
    writer.finish()
    assert landed == mine
    for shard in mine:
        images, labels = store.read_shard(store.shard_path(tmp_path, shard), shard, SHAPE)
        np.testing.assert_array_equal(images[:, 0, 0, 0], shard.indices)
        np.testing.assert_array_equal(labels, shard.indices + 100)
    assert not store.shard_path(tmp_path, plan.shard(1)).exists()


def test_out_of_order_samples_are_refused(tmp_path):
    shard = store.ShardPlan(4, 4).shard(0)
    writer = ShardWriter(fake_decode, tmp_path, [shard], SHAPE, 4).start()
    writer.submit(np.array([0, 2]), np.array([0, 0]), latents_for([0, 2]))
    with pytest.raises(RuntimeError, match="out of order"):
        writer.finish()


def test_too_few_samples_are_reported(tmp_path):
    shard = store.ShardPlan(4, 4).shard(0)
    writer = ShardWriter(fake_decode, tmp_path, [shard], SHAPE, 4).start()
    writer.submit(np.array([0, 1]), np.array([0, 0]), latents_for([0, 1]))
    with pytest.raises(RuntimeError, match="finished 0 of 1 shards"):
        writer.finish()


def test_a_decoding_failure_names_the_sample_indices_and_writes_nothing(tmp_path):
    def checking_decode(latents):
        """Refuses non-finite rows as the real decoder's uint8 mapping does (by batch row)."""
        check_rows(latents, "decoding")
        return fake_decode(latents)

    shard = store.ShardPlan(8, 4).shard(1)  # samples 4-7
    writer = ShardWriter(checking_decode, tmp_path, [shard], SHAPE, 8).start()
    latents = latents_for([4, 5, 6, 7]).clone()
    latents[2, 1, 0, 0] = float("inf")
    writer.submit(shard.indices, np.zeros(4), latents)
    with pytest.raises(NonFiniteSamplesError, match=r"decoding .*sample indices \[6\]"):
        writer.finish()
    assert not store.shard_path(tmp_path, shard).exists()


def test_abort_in_the_middle_of_a_shard_stops_promptly(tmp_path):
    gate = threading.Event()

    def blocking_decode(latents):
        gate.wait(timeout=10)
        return fake_decode(latents)

    plan = store.ShardPlan(8, 4)
    writer = ShardWriter(blocking_decode, tmp_path, plan.shards, SHAPE, 8, queue_size=2).start()
    for start in (0, 2, 4):
        batch = np.arange(start, start + 2)
        writer.submit(batch, batch, latents_for(batch))
    gate.set()
    writer.abort()
    assert not writer._thread.is_alive()
    assert not store.shard_path(tmp_path, plan.shard(1)).exists()


def test_bench_smoke(capsys):
    """The end-to-end vs sampler benchmark runs (its numbers matter on a GPU only)."""
    from selfflow.batch.bench import main

    assert (
        main(
            ["--tiny", "--device", "cpu", "--batch-size", "4", "--num-steps", "2", "--batches", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| sampler alone (sample_latents) |" in out and "end-to-end / sampler = " in out
