"""Assembly: the npz content, and peak memory that does not grow with N."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from selfflow.base.npz import iter_npz_rows
from selfflow.batch import store
from selfflow.batch.assemble import assemble

SHAPE = (64, 64, 3)  # 12 KiB per image


def _shard_images(shard: store.Shard) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic content per shard, so the test can rebuild any part independently."""
    rng = np.random.default_rng(shard.id)
    return (
        rng.integers(0, 256, size=(shard.size, *SHAPE), dtype=np.uint8),
        rng.integers(0, 1000, size=shard.size),
    )


def _make_shards(folder, num_samples, shard_size):
    plan = store.ShardPlan(num_samples, shard_size)
    for shard in plan.shards:
        store.write_shard(folder, shard, *_shard_images(shard))
    return plan


def test_assembled_npz_is_in_index_order_with_labels(tmp_path):
    plan = _make_shards(tmp_path, 23, 5)
    path, first = assemble(tmp_path, plan, SHAPE)
    assert path.name == "samples_23.npz"
    expected = [_shard_images(shard) for shard in plan.shards]
    images = np.concatenate([e[0] for e in expected])
    with np.load(path, allow_pickle=False) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (23, *SHAPE)
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], np.concatenate([e[1] for e in expected]))
    np.testing.assert_array_equal(
        np.concatenate(list(iter_npz_rows(path, rows_per_block=4))), images
    )
    np.testing.assert_array_equal(first, images)  # fewer than 64 samples: the grid takes all


def test_a_damaged_shard_stops_assembly_and_leaves_no_npz(tmp_path):
    plan = _make_shards(tmp_path, 12, 4)
    path = store.shard_path(tmp_path, plan.shard(1))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(store.ShardError, match="shard_00001.npz: unreadable"):
        assemble(tmp_path, plan, SHAPE)
    assert not list(tmp_path.glob("*samples_12*"))


_MEASURE = """
import json, resource, sys, tracemalloc
from pathlib import Path
from selfflow.batch import store
from selfflow.batch.assemble import assemble
folder, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tracemalloc.start()
assemble(folder, store.ShardPlan(n, size), (64, 64, 3))
peak_traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "traced_peak": peak_traced, "torch": "torch" in sys.modules}))
"""


def _measure(folder, n, size):
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), str(n), str(size)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_of_assembly_does_not_grow_with_n(tmp_path):
    small, large, shard_size = 500, 8000, 100
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    _make_shards(tmp_path / "small", small, shard_size)
    _make_shards(tmp_path / "large", large, shard_size)
    a = _measure(tmp_path / "small", small, shard_size)
    b = _measure(tmp_path / "large", large, shard_size)
    extra_bytes = (large - small) * int(np.prod(SHAPE))  # 92 MB more images
    shard_bytes = shard_size * int(np.prod(SHAPE))  # 1.2 MB per shard
    assert not a["torch"] and not b["torch"]  # assembly stays numpy-only
    # Python-level allocations: a few shards' worth, whatever N is.
    assert b["traced_peak"] < 4 * shard_bytes
    assert b["traced_peak"] - a["traced_peak"] < shard_bytes
    # Whole-process peak RSS: the growth is a small fraction of the extra images.
    grew = (b["maxrss_kib"] - a["maxrss_kib"]) * 1024
    assert grew < 0.1 * extra_bytes, (a, b)
    with np.load(tmp_path / "large" / f"samples_{large}.npz") as npz:
        shard = store.ShardPlan(large, shard_size).shard(57)
        np.testing.assert_array_equal(
            npz["arr_0"][shard.start : shard.stop], _shard_images(shard)[0]
        )
