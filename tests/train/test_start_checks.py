"""What a new user's first runs ran into (a new-user pass over ``selfflow train``): held-out data
that is not held out, options named in words, a start over that logged every step twice, the
repair of a damaged held-out shard, and a VAE of another latent space that passed the dry run.

Each is refused (or mended) before anything is written; the data come from a real
``prepare --val-per-class`` of a tiny image tree with a tiny 4-channel VAE."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from selfflow import cli
from selfflow.base.errors import ConfigurationError, DatasetError
from selfflow.data import LatentDataset
from selfflow.train.state import list_checkpoints
from selfflow.train.trainer import train
from tests.conftest import make_tiny_vae
from tests.data.trees import write_tree

from .helpers import log_records, make_dataset, tiny_config
from .test_validation import val_dataset

PER_CLASS = 2


def prepare_split(root: Path, vae: str) -> tuple[Path, Path, Path]:
    """``selfflow prepare TREE root/lat --val-per-class 2`` through the command line: the
    image tree, the training part and the held-out part ``lat-val``."""
    tree = root / "images" if (root / "images").is_dir() else write_tree(root / "images")
    assert cli.main([*prepare_args(tree, root / "lat", vae), "--no-progress"]) == 0
    return tree, root / "lat", root / "lat-val"


def prepare_args(tree: Path, out: Path, vae: str) -> list[str]:
    return [
        "prepare", str(tree), str(out), "--vae", vae, "--image-size", "16", "--shard-size", "5",
        "--batch-size", "3", "--num-workers", "0", "--val-per-class", str(PER_CLASS),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_vae_dir) -> tuple[Path, Path, Path]:
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare_split(tmp_path_factory.mktemp("split"), tiny_vae_dir)


def refusal(config, **kwargs) -> str:
    """The one-line refusal of a start, checking that nothing was written."""
    with pytest.raises((ConfigurationError, DatasetError)) as caught:
        train(config, **kwargs)
    assert not Path(config.output_dir).exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- 1. validation data that is not held out ---------------------------------------------------


def test_the_training_data_itself_or_the_swapped_halves_are_refused_as_val_data(split, tmp_path):
    _, lat, lat_val = split
    config = tiny_config(lat, tmp_path / "same", val_data=str(lat), val_every=1)
    for dry_run in (True, False):
        message = refusal(config, dry_run=dry_run)
        assert "training data itself" in message and LatentDataset(lat).identity in message
    swapped = tiny_config(lat_val, tmp_path / "swapped", val_data=str(lat), val_every=1)
    message = refusal(swapped)
    assert f"--val-data {lat} is the training part" in message
    assert f"--data {lat_val} is the held-out part" in message
    # and both say what to pass instead: the split's halves the right way round
    right_way = f"--data {lat.resolve()} --val-data {lat_val.resolve()}"
    assert message.endswith(right_way), message
    assert refusal(config).endswith(right_way)
    # the halves the right way round, and data without a holdout record, are accepted
    right = tiny_config(lat, tmp_path / "right", val_data=str(lat_val), val_every=1)
    train(right, dry_run=True, log=lambda m: None)
    plain = make_dataset(tmp_path / "plain")  # write_dataset: no holdout record
    held_out = val_dataset(tmp_path / "held", n=12)
    train(tiny_config(plain, tmp_path / "a", val_data=str(held_out), val_every=1), dry_run=True)
    copy = make_dataset(tmp_path / "copy")  # the same rows written again: the same identity
    message = refusal(tiny_config(plain, tmp_path / "b", val_data=str(copy), val_every=1))
    assert "training data itself" in message and "--val-per-class N" in message


# -- 2. the options named in words -------------------------------------------------------------


def test_missing_validation_options_are_named_in_words_not_as_none(tmp_path):
    data = make_dataset(tmp_path / "data")
    message = refusal(tiny_config(data, tmp_path / "a", val_every=2))
    assert "got --val-every 2 and no --val-data" in message and "None" not in message
    message = refusal(tiny_config(data, tmp_path / "b", val_data=str(data)))
    assert f"got --val-data {data} and no --val-every" in message and "None" not in message
    missing = tmp_path / "nonexist"
    message = refusal(tiny_config(data, tmp_path / "c", val_data=str(missing), val_every=1))
    assert message.startswith(f"--val-data {missing}: ") and "does not exist" in message


# -- 3. a start over after an attempt killed before its first checkpoint -----------------------


def test_a_start_over_logs_each_step_once_in_the_log_and_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, held = make_dataset(tmp_path / "data"), val_dataset(tmp_path / "val", n=12)
    run = tmp_path / "run"
    config = tiny_config(data, run, steps=3, checkpoint_every=1000, val_data=str(held), val_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config)
        for _, path in list_checkpoints(run):  # as if killed before its first checkpoint
            path.unlink()
        with (run / "log.jsonl").open("a") as log:  # and half way through a line
            log.write('{"step": 3, "lo')
        train(config)  # starts over at step 0
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_records(run)] == [1, 2, 3]
    assert [r["step"] for r in log_records(run, "val")] == [0, 2, 3]
    seen = [(r.get("kind"), r["step"]) for r in lines]
    assert len(seen) == len(set(seen)), seen
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "val/loss_mean/online" in tags and any(t.startswith("train/") for t in tags)
    for tag in tags:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    # and what TensorBoard shows is the second attempt's numbers, as log.jsonl has them
    second = {r["step"]: r for r in log_records(run, "val")}
    shown = {e.step: e.value for e in events.Scalars("val/loss_mean/online")}
    assert shown == {s: pytest.approx(r["loss_mean/online"], rel=1e-6) for s, r in second.items()}


# -- 4. the repair of a damaged held-out shard -------------------------------------------------


def test_a_damaged_held_out_shard_names_the_prepare_that_mends_it(tmp_path, tiny_vae_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        tree, lat, lat_val = prepare_split(tmp_path, tiny_vae_dir)
    identity = LatentDataset(lat_val).identity
    shard = sorted((lat_val / "shards").glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    want = f"`selfflow prepare {tree.resolve()} {lat.resolve()} --val-per-class {PER_CLASS}`"
    message = refusal(tiny_config(lat, tmp_path / "run", val_data=str(lat_val), val_every=1))
    assert message.startswith(f"--val-data {lat_val}: ") and want in message, message
    assert f"{lat_val}` with the options" not in message
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        assert cli.main(["prepare", "--verify", str(lat_val)]) != 0
    assert want in printed.getvalue(), printed.getvalue()
    # what it says mends it: delete the damaged shard, rerun the training folder's prepare
    shard.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*prepare_args(tree, lat, tiny_vae_dir), "--no-progress"]) == 0
    assert LatentDataset(lat_val).identity == identity
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["prepare", "--verify", str(lat_val)]) == 0


# -- 5. a VAE of another latent space ----------------------------------------------------------


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, str]:
    """A 16-channel VAE (another latent space), and a 4-channel one of the data's space with
    another encoder (its weights moved)."""
    root = tmp_path_factory.mktemp("vaes")
    make_tiny_vae(latent_channels=16).save_pretrained(root / "sixteen")
    other = make_tiny_vae()
    with torch.no_grad():
        next(other.encoder.parameters()).add_(0.01)
    other.save_pretrained(root / "other")
    return {"sixteen": str(root / "sixteen"), "other": str(root / "other")}


def test_a_vae_of_another_latent_space_is_refused_at_start_even_when_mismatch_is_allowed(
    split, vaes, tmp_path
):
    _, lat, _ = split
    for allow in (True, False):
        for dry_run in (True, False):
            config = tiny_config(
                lat, tmp_path / "run", vae=vaes["sixteen"], allow_vae_mismatch=allow
            )
            message = refusal(config, dry_run=dry_run, log=lambda m: None)
            assert "16 channels" in message and "4 channels" in message, message
            assert vaes["sixteen"] in message and str(lat) in message
    # --allow-vae-mismatch still lets another encoder of the same latent space decode
    logged: list[str] = []
    other = tiny_config(lat, tmp_path / "other", vae=vaes["other"], allow_vae_mismatch=True)
    train(other, dry_run=True, log=logged.append)
    assert any("warning" in line and "encoder" in line for line in logged), logged
    assert "encoder" in refusal(tiny_config(lat, tmp_path / "x", vae=vaes["other"]))
