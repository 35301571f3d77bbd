"""The dataset format: what write_dataset stores, LatentDataset reads back, bit for bit."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from selfflow.base.errors import DatasetError, SelfFlowError
from selfflow.data import LatentDataset, write_dataset
from selfflow.data.store import MANIFEST_NAME


def arrays(n: int = 23, shape=(4, 3, 5), classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n, *shape)).astype(np.float32)
    stds = rng.random((n, *shape)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return means, stds, labels


@pytest.fixture
def posterior(tmp_path):
    means, stds, labels = arrays()
    write_dataset(tmp_path / "ds", means, labels, stds=stds, class_names=list("abcd"), shard_size=5)
    return LatentDataset(tmp_path / "ds"), means, stds, labels


def test_items_are_the_written_arrays_in_order(posterior):
    ds, means, stds, labels = posterior
    assert len(ds) == 23 and ds.latent_shape == (4, 3, 5)
    assert ds.class_names == list("abcd") and ds.num_classes == 4
    assert ds.has_std and ds.scale == 1.0 and ds.vae is None
    for i in range(len(ds)):
        mean, std, label = ds[i]
        assert mean.dtype == torch.float32 and std.dtype == torch.float32
        assert np.array_equal(mean.numpy(), means[i]) and np.array_equal(std.numpy(), stds[i])
        assert isinstance(label, int) and label == labels[i]
    assert np.array_equal(ds[-1][0].numpy(), means[-1])
    with pytest.raises(IndexError):
        ds[23]


def test_get_batch_matches_indexing_for_any_order_and_repeats(posterior):
    ds, means, stds, labels = posterior
    rng = np.random.default_rng(1)
    for indices in (rng.integers(0, 23, 40), np.array([22, 0, 7, 7, 21]), np.arange(23)[::-1]):
        got_means, got_stds, got_labels = ds.get_batch(indices)
        assert got_means.dtype == torch.float32 and got_labels.dtype == torch.int64
        assert np.array_equal(got_means.numpy(), means[indices])
        assert np.array_equal(got_stds.numpy(), stds[indices])
        assert np.array_equal(got_labels.numpy(), labels[indices])
    empty = ds.get_batch(np.array([], dtype=np.int64))
    assert empty[0].shape == (0, 4, 3, 5)
    with pytest.raises(IndexError, match="23"):
        ds.get_batch(np.array([3, 23]))


def test_data_without_std_gives_zero_std_and_no_batch_std(tmp_path):
    means, _, labels = arrays(n=7)
    written = write_dataset(tmp_path / "raw", torch.from_numpy(means), torch.from_numpy(labels))
    assert written == tmp_path / "raw"
    ds = LatentDataset(written)
    assert not ds.has_std and ds.scale == 1.0
    assert ds.class_names == [str(k) for k in range(labels.max() + 1)]
    mean, std, _ = ds[3]
    assert np.array_equal(mean.numpy(), means[3]) and not std.any()
    batch_means, batch_stds, _ = ds.get_batch(np.array([6, 1]))
    assert batch_stds is None and np.array_equal(batch_means.numpy(), means[[6, 1]])


def test_float16_storage_reads_back_as_float32(tmp_path):
    means, stds, labels = arrays(n=9)
    write_dataset(tmp_path, means, labels, stds=stds, dtype="float16", shard_size=4)
    ds = LatentDataset(tmp_path)
    got_means, got_stds, _ = ds.get_batch(np.arange(9))
    assert got_means.dtype == torch.float32
    assert np.array_equal(got_means.numpy(), means.astype(np.float16).astype(np.float32))
    assert np.array_equal(ds[4][1].numpy(), stds[4].astype(np.float16).astype(np.float32))


def test_identity_is_stable_and_follows_the_data(tmp_path):
    means, stds, labels = arrays()
    write_dataset(tmp_path / "a", means, labels, stds=stds)
    write_dataset(tmp_path / "b", means, labels, stds=stds)
    changed = means.copy()
    changed[5, 0, 0, 0] += 1
    write_dataset(tmp_path / "c", changed, labels, stds=stds)
    relabelled = labels.copy()
    relabelled[0] = (labels[0] + 1) % 4
    write_dataset(tmp_path / "d", means, relabelled, stds=stds)
    ids = [LatentDataset(tmp_path / name).identity for name in "abcd"]
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_reading_never_writes(posterior, tmp_path):
    ds, *_ = posterior
    before = {p: p.stat().st_mtime_ns for p in ds.root.rglob("*")}
    ds.get_batch(np.arange(23))
    ds[0]
    LatentDataset(ds.root)
    assert {p: p.stat().st_mtime_ns for p in ds.root.rglob("*")} == before


def test_bad_folders_are_refused_with_the_reason(tmp_path, posterior):
    with pytest.raises(DatasetError, match="does not exist"):
        LatentDataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        LatentDataset(tmp_path / "plain")
    ds, *_ = posterior
    manifest = ds.root / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match="damaged"):
        LatentDataset(ds.root)
    data = json.loads(text)
    data["class_names"] = list("abce")
    manifest.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="identity"):
        LatentDataset(ds.root)
    assert issubclass(DatasetError, SelfFlowError)


def test_changed_labels_are_reported(posterior):
    ds, _, _, labels = posterior
    changed = labels.copy()
    changed[3] = (changed[3] + 1) % 4
    np.save(ds.root / "labels.npy", changed)
    with pytest.raises(DatasetError, match="labels.npy is damaged"):
        LatentDataset(ds.root)


def test_a_truncated_shard_is_reported(posterior):
    ds, *_ = posterior
    shard = ds.root / "shards" / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DatasetError, match="shard_00001.npy is truncated: 200 bytes"):
        LatentDataset(ds.root)  # refused when opened, before any reader starts
    reopened = LatentDataset(ds.root, check_files=False)
    with pytest.raises(DatasetError, match="shard_00001"):
        reopened.get_batch(np.array([6]))


def test_write_dataset_checks_its_inputs(tmp_path):
    means, stds, labels = arrays(n=5)
    with pytest.raises(DatasetError, match="labels must be 5 integers"):
        write_dataset(tmp_path / "a", means, labels[:4])
    with pytest.raises(DatasetError, match="shape of means"):
        write_dataset(tmp_path / "b", means, labels, stds=stds[:, :2])
    with pytest.raises(DatasetError, match=r"0\.\.1"):
        write_dataset(tmp_path / "c", means, labels * 0 + 2, class_names=["x", "y"])
    bad = means.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        write_dataset(tmp_path / "d", bad, labels)
    write_dataset(tmp_path / "e", means, labels)
    with pytest.raises(DatasetError, match="already holds"):
        write_dataset(tmp_path / "e", means, labels)
    write_dataset(tmp_path / "e", means[:2], labels[:2], overwrite=True)
    assert len(LatentDataset(tmp_path / "e")) == 2


def test_pickling_sends_no_array_data(tmp_path):
    """A data-loader worker gets the dataset pickled: the maps must not travel as arrays."""
    means, stds, labels = arrays(n=3000)  # 1.4 MB of mean and std
    write_dataset(tmp_path, means, labels, stds=stds, shard_size=500)
    ds = LatentDataset(tmp_path)
    ds.get_batch(np.arange(3000))  # every shard mapped
    payload = pickle.dumps(ds)
    assert len(payload) < 100_000  # labels (24 kB) and the manifest only
    clone = pickle.loads(payload)
    assert np.array_equal(clone.get_batch(np.array([2999, 1]))[0].numpy(), means[[2999, 1]])


def test_verify_finds_a_changed_byte(posterior):
    ds, *_ = posterior
    ds.verify()
    shard = ds.root / "shards" / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="shard_00002.npy is damaged"):
        LatentDataset(ds.root).verify()


def test_many_shards_beyond_the_open_map_limit(tmp_path, monkeypatch):
    from selfflow.data import dataset

    monkeypatch.setattr(dataset, "MAX_OPEN_SHARDS", 3)
    means, stds, labels = arrays(n=40)
    write_dataset(tmp_path, means, labels, stds=stds, shard_size=2)
    ds = LatentDataset(tmp_path)
    order = np.random.default_rng(2).permutation(40)
    got_means, got_stds, _ = ds.get_batch(order)
    assert np.array_equal(got_means.numpy(), means[order])
    assert np.array_equal(got_stds.numpy(), stds[order])
    assert len(ds._maps) <= 3


def test_an_empty_shard_is_stepped_over(tmp_path):
    """A shard whose images were all skipped holds no rows; indices run on past it."""
    from selfflow.data import store

    means, stds, labels = arrays(n=5)
    rows = np.stack([means, stds], axis=1)
    records = [
        store.write_shard(tmp_path, 0, rows[:3], labels[:3]),
        store.write_shard(tmp_path, 1, rows[:0], labels[:0], {"skipped": [{"file": "x"}]}),
        store.write_shard(tmp_path, 2, rows[3:], labels[3:]),
    ]
    header = {
        "latent_shape": [4, 3, 5], "dtype": "float32", "has_std": True, "scale": 1.0,
        "vae": None, "vae_identity": None, "image_size": None, "crop": None,
        "class_names": list("abcd"), "files_digest": None, "shard_size": 3,
    }  # fmt: skip
    store.finalize(tmp_path, header, records)
    ds = LatentDataset(tmp_path)
    assert len(ds) == 5 and ds.manifest["skipped"] == [{"file": "x"}]
    got_means, got_stds, got_labels = ds.get_batch(np.array([4, 2, 3, 0]))
    assert np.array_equal(got_means.numpy(), means[[4, 2, 3, 0]])
    assert np.array_equal(got_labels.numpy(), labels[[4, 2, 3, 0]])
    assert np.array_equal(ds[3][1].numpy(), stds[3])
