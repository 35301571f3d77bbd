"""The shard plan, shard files and their checks, the manifest, and work assignment."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from selfflow.base import distributed, files
from selfflow.base.errors import ConfigurationError
from selfflow.batch import store
from selfflow.batch.manifest import (
    Manifest,
    differing_settings,
    image_settings,
    read_manifest,
    write_manifest,
)

# -- plan and assignment ------------------------------------------------------------------------


def test_default_shard_size_depends_on_n_alone():
    assert store.default_shard_size(50_000) == 125
    assert store.ShardPlan(50_000, 125).num_shards == 400
    assert store.default_shard_size(1000) == 16
    assert store.default_shard_size(10) == 1


@pytest.mark.parametrize(("n", "size"), [(50_000, 125), (24, 4), (23, 5), (1, 7)])
def test_shards_cover_every_index_once(n, size):
    plan = store.ShardPlan(n, size)
    covered = np.concatenate([shard.indices for shard in plan.shards])
    np.testing.assert_array_equal(covered, np.arange(n))
    assert all(0 < shard.size <= size for shard in plan.shards)


@pytest.mark.parametrize("world", [1, 2, 3, 8, 16])
def test_round_robin_gives_each_pending_shard_to_one_rank(world):
    pending = [0, 2, 3, 7, 8, 9, 11]
    parts = [distributed.assign(pending, rank, world) for rank in range(world)]
    assert sorted(sum(parts, [])) == pending
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigurationError):
        distributed.assign(pending, world, world)


def test_png_names_are_global_indices(tmp_path):
    assert store.png_path(tmp_path, 123, 50_000).name == "000123.png"
    assert store.png_path(tmp_path, 5, 2_000_000).name == "0000005.png"


# -- shard files --------------------------------------------------------------------------------


def _write(tmp_path, shard, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(shard.size, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, size=shard.size)
    return store.write_shard(tmp_path, shard, images, labels), images, labels


def test_shard_round_trip_leaves_no_temporary(tmp_path):
    shard = store.ShardPlan(10, 4).shard(1)
    path, images, labels = _write(tmp_path, shard)
    assert path.name == "shard_00001.npz"
    assert sorted(os.listdir(path.parent)) == ["shard_00001.npz"]
    got_images, got_labels = store.read_shard(path, shard, (4, 4, 3), labels)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_truncated_shard_is_rejected(tmp_path):
    shard = store.ShardPlan(10, 4).shard(0)
    path, _, _ = _write(tmp_path, shard)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(store.ShardError, match="unreadable"):
        store.read_shard(path, shard)


def test_flipped_image_byte_is_rejected_by_the_crc(tmp_path):
    shard = store.ShardPlan(64, 64).shard(0)
    path, images, _ = _write(tmp_path, shard)
    raw = bytearray(path.read_bytes())
    where = raw.find(images.tobytes()[:64])
    assert where > 0
    raw[where + 500] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(store.ShardError, match="unreadable"):
        store.read_shard(path, shard)


def test_shard_with_other_samples_or_labels_is_rejected(tmp_path):
    plan = store.ShardPlan(12, 4)
    path, _, labels = _write(tmp_path, plan.shard(0))
    os.replace(path, store.shard_path(tmp_path, plan.shard(1)))
    with pytest.raises(store.ShardError, match="other samples than 4…7"):
        store.read_shard(store.shard_path(tmp_path, plan.shard(1)), plan.shard(1))
    path, _, labels = _write(tmp_path, plan.shard(2))
    with pytest.raises(store.ShardError, match="labels differ"):
        store.read_shard(path, plan.shard(2), expected_labels=labels + 1)
    with pytest.raises(store.ShardError, match=r"expected \(8, 8, 3\)"):
        store.read_shard(path, plan.shard(2), image_shape=(8, 8, 3))


def test_missing_shard_is_reported(tmp_path):
    with pytest.raises(store.ShardError, match="does not exist"):
        store.read_shard(tmp_path / "nope.npz", store.ShardPlan(4, 4).shard(0))


def test_temporaries_are_removed_and_finished_files_kept(tmp_path):
    shard = store.ShardPlan(4, 4).shard(0)
    path, _, _ = _write(tmp_path, shard)
    leftover = files.temporary_name(path).with_name(".shard_00000.npz.tmp-99999")
    leftover.write_bytes(b"half a file")
    assert store.existing_shards(tmp_path, store.ShardPlan(4, 4)) == [shard]
    assert files.remove_temporaries([path.parent]) == 1
    assert sorted(os.listdir(path.parent)) == ["shard_00000.npz"]


# -- manifest ----------------------------------------------------------------------------------


def _settings(**changes):
    values = dict(
        checkpoint_sha256="ab" * 32,
        vae="stabilityai/sd-vae-ft-ema",
        num_samples=50_000,
        num_steps=250,
        mode="SDE",
        solver="heun",
        seed=31,
        cfg_scale=1.0,
        guidance_low=0.0,
        guidance_high=0.7,
        class_balanced=False,
        num_classes=1000,
        dtype="bfloat16",
        network="FastSelfFlow/bfloat16",
        vae_dtype="bfloat16",
    )
    values.update(changes)
    return image_settings(**values)


def test_settings_that_cannot_change_images_do_not_block_a_resume():
    assert differing_settings(_settings(), _settings(solver="euler")) == []  # SDE ignores it
    assert differing_settings(_settings(), _settings(guidance_high=0.9)) == []  # cfg 1: no guidance
    assert differing_settings(_settings(mode="sde"), _settings(mode="SDE")) == []
    guided = _settings(cfg_scale=1.5)
    assert differing_settings(guided, _settings(cfg_scale=1.5, guidance_high=0.9)) == [
        "guidance_high: 0.7 in the folder, 0.9 now"
    ]
    assert differing_settings(_settings(mode="ode"), _settings(mode="ode", solver="euler")) == [
        "solver: 'heun' in the folder, 'euler' now"
    ]


def test_every_differing_setting_is_named():
    names = [
        line.split(":")[0]
        for line in differing_settings(
            _settings(), _settings(seed=32, num_steps=100, dtype="float32")
        )
    ]
    assert names == ["num_steps", "seed", "dtype"]


def test_manifest_round_trip_and_damage(tmp_path):
    manifest = Manifest(_settings(), 125, (256, 256, 3), info={"x": 1})
    write_manifest(tmp_path, manifest)
    back = read_manifest(tmp_path)
    assert back.settings == manifest.settings and back.shard_size == 125
    assert back.image_shape == (256, 256, 3) and back.complete is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="unreadable.*--overwrite"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigurationError, match="not a selfflow sample manifest"):
        read_manifest(tmp_path)


# -- torchrun environment -----------------------------------------------------------------------


def test_torchrun_environment_is_read_from_its_variables_only():
    assert distributed.torchrun_environment({}) is None
    assert distributed.torchrun_environment(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    ) == (3, 8, 3)
    with pytest.raises(ConfigurationError, match="not \\['WORLD_SIZE', 'LOCAL_RANK'\\]"):
        distributed.torchrun_environment({"RANK": "0"})
    with pytest.raises(ConfigurationError, match="inconsistent"):
        distributed.torchrun_environment({"RANK": "8", "WORLD_SIZE": "8", "LOCAL_RANK": "0"})


def test_device_resolution():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.resolve_device(None) == torch.device("cpu")
        with pytest.raises(ConfigurationError, match="no CUDA device"):
            distributed.resolve_device("cuda", local_rank=1)
    with pytest.raises(ConfigurationError, match="torch device"):
        distributed.resolve_device("gpu-please")


def test_an_explicit_gpu_index_under_torchrun_must_be_the_local_rank(monkeypatch):
    """No GPU needed: the index is checked before CUDA is looked for."""
    with pytest.raises(ConfigurationError) as caught:
        distributed.resolve_device("cuda:1", local_rank=0, world_size=2)
    message = str(caught.value)
    assert "WORLD_SIZE=2" in message and "GPU 1" in message and "pass --device cuda " in message
    # the same through torchrun's variables, before any process group is joined
    for name, value in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigurationError, match=r"LOCAL_RANK=0\); pass --device cuda "):
        distributed.setup("cuda:3")
    # one process, or the index every process would pick anyway: not this error
    for spec, local, world in (("cuda:1", 0, 1), ("cuda:1", 1, 2), ("cuda", 1, 2)):
        try:
            distributed.resolve_device(spec, local_rank=local, world_size=world)
        except ConfigurationError as error:
            assert "LOCAL_RANK" not in str(error)


def test_a_planning_context_is_the_jobs_place_without_a_group_or_a_device(monkeypatch):
    for name, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # setup() would refuse: no group here
    context = distributed.planning_context("cuda")  # whether or not this machine has CUDA
    assert (context.rank, context.world_size, context.local_rank) == (3, 8, 1)
    assert context.device == torch.device("cuda", 1) and not context.is_distributed
    assert distributed.all_gather_objects(context, "x") == ["x"]  # collectives are no-ops
    with pytest.raises(ConfigurationError, match="GPU 0"):  # the usual checks still apply
        distributed.planning_context("cuda:0")
