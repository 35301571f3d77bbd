"""``selfflow prepare --val-per-class N`` (issue 20): N images of each class held out into
``OUT_DIR-val``, chosen by a documented key of each file's path, never in a training batch."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from selfflow import cli
from selfflow.base.errors import ConfigurationError
from selfflow.data import LatentDataset
from selfflow.train.config import TrainConfig
from selfflow.train.streams import DataOrder, draw_step, run_streams
from tests.data.test_prepare import expected_order, prepare
from tests.data.trees import CLASSES, write_tree

PER_CLASS = 2


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "train")


@pytest.fixture(scope="module")
def split(tree, tiny_vae_dir, tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """The whole tree prepared once, and once with N held out (through the command line)."""
    root = tmp_path_factory.mktemp("split")
    prepare(tree, root / "whole", tiny_vae_dir)
    args = ["prepare", str(tree), str(root / "latents"), "--vae", tiny_vae_dir]
    args += ["--image-size", "16", "--shard-size", "5", "--batch-size", "3"]
    args += ["--num-workers", "0", "--no-progress", "--val-per-class", str(PER_CLASS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(args) == 0
    return root / "whole", root / "latents", root / "latents-val", printed.getvalue()


def expected_held_out(tree: Path) -> list[str]:
    """The documented rule, restated: per class, the N paths with the smallest sha256 of
    ``selfflow/holdout/CLASS/FILE``; listed in dataset order."""
    held = []
    for name in sorted(CLASSES):
        files = sorted(p.name for p in (tree / name).iterdir())
        key = {
            f: hashlib.sha256(f"selfflow/holdout/{name}/{f}".encode()).hexdigest() for f in files
        }
        chosen = set(sorted(files, key=key.get)[:PER_CLASS])
        held += [f"{name}/{f}" for f in files if f in chosen]
    return held


def test_the_held_out_images_follow_the_rule_and_both_manifests_record_them(split, tree):
    whole, train_dir, val_dir, printed = split
    held = expected_held_out(tree)
    assert len(held) == PER_CLASS * len(CLASSES)
    for folder, part in ((train_dir, "train"), (val_dir, "val")):
        manifest = json.loads((folder / "manifest.json").read_text())
        record = manifest["holdout"]
        assert record["part"] == part and record["per_class"] == PER_CLASS
        assert record["held_out_files"] == held
        assert record["train"] == str(train_dir.resolve())
        assert record["val"] == str(val_dir.resolve())
    train, val = LatentDataset(train_dir), LatentDataset(val_dir)
    assert (len(train), len(val)) == (24 - len(held), len(held))
    assert train.class_names == val.class_names == sorted(CLASSES)
    assert "held out, never trained on" in printed and str(val_dir) in printed


def test_every_image_is_in_exactly_one_half_with_its_own_posterior(split, tree):
    whole, train_dir, val_dir, _ = split
    held = set(expected_held_out(tree))
    full, train, val = LatentDataset(whole), LatentDataset(train_dir), LatentDataset(val_dir)
    next_row = {"train": 0, "val": 0}
    for i, (path, label) in enumerate(expected_order(tree)):
        part = "val" if f"{path.parent.name}/{path.name}" in held else "train"
        dataset = val if part == "val" else train
        mean, std, got = dataset[next_row[part]]
        next_row[part] += 1
        assert got == label
        reference_mean, reference_std, _ = full[i]
        np.testing.assert_allclose(mean, reference_mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(std, reference_std, rtol=0, atol=1e-6)
    assert next_row == {"train": len(train), "val": len(val)}


def test_no_training_batch_holds_a_held_out_image(split):
    _, train_dir, val_dir, _ = split
    train, val = LatentDataset(train_dir), LatentDataset(val_dir)
    val_means = val.get_batch(np.arange(len(val)))[0].numpy()
    config = TrainConfig(
        data=str(train_dir), output_dir="unused", steps=1, model="tiny", global_batch_size=4
    )
    resolved = config.resolve(train.latent_shape, train.num_classes)
    spec, order = run_streams(resolved, train)
    assert isinstance(order, DataOrder)
    seen = set()
    for step in range(3 * len(train) // 4):  # three epochs
        indices = draw_step(spec, order, step).indices
        seen.update(indices.tolist())
        means = train.get_batch(indices)[0].numpy()
        # the smallest distance from a batch row to any held-out image: far from zero
        gaps = np.abs(means[:, None] - val_means[None]).reshape(len(means), len(val), -1)
        assert gaps.max(-1).min() > 1e-3
    assert seen == set(range(len(train)))


def test_rerunning_does_nothing_and_too_few_images_are_refused(split, tree, tiny_vae_dir, tmp_path):
    _, train_dir, val_dir, _ = split
    before = {p: p.stat().st_mtime_ns for p in [*train_dir.rglob("*"), *val_dir.rglob("*")]}
    result = prepare(tree, train_dir, tiny_vae_dir, val_per_class=PER_CLASS)
    assert result.new_images == 0 and result.held_out.new_images == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(ConfigurationError, match=r"--val-per-class 8 .* ant \(8\)"):
        prepare(tree, tmp_path / "latents", tiny_vae_dir, val_per_class=8)
    assert not (tmp_path / "latents-val").exists()
