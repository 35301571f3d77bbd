"""A damaged shard is redone, whatever zipfile raises on its bytes (seeded random damage)."""

from __future__ import annotations

import numpy as np

from selfflow.batch import store


def test_random_damage_to_a_shard_is_a_shard_error_or_harmless(tmp_path):
    plan = store.ShardPlan(8, 4)
    shard = plan.shard(0)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = store.write_shard(tmp_path, shard, images, np.arange(4))
    data = path.read_bytes()
    rng = np.random.default_rng(1)
    refused = 0
    for n in range(600):  # flipped bytes, garbled runs (header fields: "compression method" …)
        raw = bytearray(data)
        at = int(rng.integers(len(raw) - 3))
        if n % 2:
            raw[at] ^= int(rng.integers(1, 256))
        else:
            raw[at : at + 3] = rng.bytes(3)
        path.write_bytes(bytes(raw))
        try:
            got, _ = store.read_shard(path, shard, (8, 8, 3))
        except store.ShardError:
            refused += 1
            continue
        np.testing.assert_array_equal(got, images)  # accepted: then the very images written
    assert refused > 400
