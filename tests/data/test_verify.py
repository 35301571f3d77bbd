"""`selfflow prepare --verify DIR` and the repair it advises (issue 23, item 6)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from selfflow import cli
from selfflow.data import LatentDataset
from tests.data.test_prepare import prepare
from tests.data.trees import files_in, write_tree


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vae_dir) -> tuple[Path, Path]:
    """24 images of 3 classes in five shards, by `selfflow prepare`: (image tree, dataset)."""
    tree = write_tree(tmp_path_factory.mktemp("tree") / "train")
    out = tmp_path_factory.mktemp("prepared") / "latents"
    prepare(tree, out, tiny_vae_dir)
    return tree, out


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def test_verify_passes_an_intact_dataset(prepared, capsys):
    assert cli.main(["prepare", "--verify", str(prepared[1]), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "all 5 shards" in out[0] and "24 images" in out[0]


def test_verify_names_every_damaged_shard_and_exits_1(prepared, tmp_path, capsys):
    _, data = prepared
    out = tmp_path / "copy"
    shutil.copytree(data, out)
    flip_a_byte(out / "shards" / "shard_00001.npy")
    (out / "shards" / "shard_00003.npy").unlink()
    assert cli.main(["prepare", "--verify", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.strip()
    assert "\n" not in line and line.startswith("selfflow prepare: error: 2 of the 5 shards")
    assert "shard_00001.npy is damaged" in line and "shard_00003.npy is missing" in line
    found = hashlib.sha256((out / "shards" / "shard_00001.npy").read_bytes()).hexdigest()
    assert found[:12] in line  # the digest found, computed here independently
    assert "shard_00000" not in line and "shard_00002" not in line
    assert "rerun `selfflow prepare" in line


def test_deleting_the_damaged_shard_and_rerunning_prepare_mends_the_dataset(
    prepared, tiny_vae_dir, tmp_path, capsys
):
    tree, data = prepared
    out = tmp_path / "copy"
    shutil.copytree(data, out)
    flip_a_byte(out / "shards" / "shard_00002.npy")
    assert cli.main(["prepare", "--verify", str(out), "--no-progress"]) == 1
    (out / "shards" / "shard_00002.npy").unlink()  # as the error advises
    result = prepare(tree, out, tiny_vae_dir)
    assert result.new_images == 5  # that shard alone is encoded again
    assert files_in(out) == files_in(data)  # the same bytes as the first time, on the CPU
    LatentDataset(out).verify()


def test_verify_and_its_inputs_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "--verify DIR" in capsys.readouterr().out
    assert cli.main(["prepare", "--verify", "somewhere", "extra"]) == 1
    assert "takes no IMAGE_DIR" in capsys.readouterr().err
