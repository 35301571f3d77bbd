"""Read-only folders and full disks, for every command that writes: one line, no traceback.

Each case runs the command as a user does (``selfflow.cli.main``) against a real file system
that refuses the write: a tmpfs mounted read-only, or a small tmpfs filled up but for a few
kilobytes. The command must exit with status 1 and print one line that names the folder and
what failed, leave no temporary file, keep what it finished, and (prepare, train, sample,
download) continue when rerun once space is freed.

Mounting needs root: elsewhere these tests are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selfflow import cli
from selfflow.base.files import is_temporary_name
from tests.data.trees import write_tree


def run(capsys, *args: str) -> tuple[int, list[str]]:
    """Exit status and the non-empty lines on stderr (progress bars split on their \\r)."""
    code = cli.main([str(arg) for arg in args])
    err = capsys.readouterr().err
    lines = [part for line in err.splitlines() for part in line.split("\r") if part.strip()]
    return code, lines


def assert_one_error_line(code: int, lines: list[str], command: str, folder: Path, *words):
    """Status 1, one error line (the last) naming ``folder`` and what failed, no traceback."""
    assert code == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if line.startswith(f"selfflow {command}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert str(folder) in errors[0], errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temporary_name(p.name)]


READ_ONLY = "read-only file system"
NO_SPACE = "no space left on the device"


# -- prepare --------------------------------------------------------------------------------------


def prepare_args(tree: Path, out: Path, vae: str) -> list[str]:
    return [
        "prepare", tree, out, "--vae", vae, "--image-size", "16", "--shard-size", "4",
        "--batch-size", "4", "--num-workers", "0", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "train", per_class=4)


def test_prepare_into_a_read_only_folder(mounts, tree, tiny_vae_dir, capsys):
    ro = mounts.read_only()
    for out in (ro, ro / "latents"):
        code, lines = run(capsys, *prepare_args(tree, out, tiny_vae_dir))
        assert_one_error_line(code, lines, "prepare", ro, READ_ONLY)
        assert len(lines) == 1, lines  # refused before any work: nothing else was printed


def test_prepare_on_a_full_disk_keeps_its_shards_and_continues(mounts, tree, tiny_vae_dir, capsys):
    # 12 images in 3 shards of 4: each shard is an 8.3 KB array and its record (16 KB on a
    # tmpfs), the manifest 4 KB more; 24 KB free takes the manifest and one shard
    disk = mounts.full(leave=24 << 10)
    out = disk / "latents"
    code, lines = run(capsys, *prepare_args(tree, out, tiny_vae_dir))
    assert_one_error_line(code, lines, "prepare", out / "shards", NO_SPACE, "free in", "rerun")
    assert not temporaries(disk)
    finished = sorted((out / "shards").glob("*.json"))
    assert len(finished) == 1
    kept = {p: (p.stat().st_ino, p.read_bytes()) for p in (out / "shards").iterdir()}

    mounts.free_space(disk)
    code, lines = run(capsys, *prepare_args(tree, out, tiny_vae_dir))
    assert code == 0, lines
    assert any("(1 of 3 already done)" in line for line in lines), lines
    for path, (inode, data) in kept.items():  # the finished shard was kept, not redone
        assert path.stat().st_ino == inode and path.read_bytes() == data
    from selfflow.data import LatentDataset

    assert LatentDataset(out).labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


# -- train and export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tests.train.helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "data", n=16)


def train_args(data: Path, out: Path) -> list[str]:
    return [
        "train", "--data", data, "--output-dir", out, "--steps", "4", "--model", "tiny",
        "--global-batch-size", "4", "--checkpoint-every", "2", "--sample-every", "0",
        "--log-every", "1", "--no-progress", "--device", "cpu", "--keep-last", "3",
    ]  # fmt: skip


def test_train_into_a_read_only_folder(mounts, dataset, capsys):
    ro = mounts.read_only()
    code, lines = run(capsys, *train_args(dataset, ro / "run"))
    assert_one_error_line(code, lines, "train", ro, READ_ONLY)


@pytest.mark.slow  # two short training runs
def test_train_on_a_full_disk_keeps_its_checkpoints_and_continues(mounts, dataset, capsys):
    # a checkpoint of the tiny model is 3.2 MB and its export 0.8 MB; the start wants room
    # for one pair (5.2 MB): 6 MB free takes step 2's pair, not step 4's checkpoint
    disk = mounts.full(leave=6 << 20)
    out = disk / "run"
    code, lines = run(capsys, *train_args(dataset, out))
    assert_one_error_line(
        code, lines, "train", out / "checkpoints", NO_SPACE, "step_000000004", "free in"
    )
    assert not temporaries(disk)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the export is written first, so a checkpoint is never without its export
    assert names[:2] == ["step_000000002-ema.pt", "step_000000002.pt"]
    assert "step_000000004.pt" not in names
    kept = (out / "checkpoints" / "step_000000002.pt").read_bytes()

    mounts.free_space(disk)
    capsys.readouterr()
    assert cli.main([str(a) for a in train_args(dataset, out)]) == 0
    assert "resuming from" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [
        "step_000000002-ema.pt", "step_000000002.pt", "step_000000004-ema.pt", "step_000000004.pt"
    ]  # fmt: skip
    assert (out / "checkpoints" / "step_000000002.pt").read_bytes() == kept


@pytest.fixture(scope="module")
def run_folder(dataset, tmp_path_factory) -> Path:
    from selfflow.train import train
    from tests.train.helpers import tiny_config

    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(dataset, out, steps=1, checkpoint_every=1, global_batch_size=4))
    return out


def test_export_into_a_read_only_folder(mounts, run_folder, capsys):
    ro = mounts.read_only()
    code, lines = run(capsys, "export", run_folder, ro / "model.pt")
    assert_one_error_line(code, lines, "export", ro, READ_ONLY)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_export_on_a_full_disk(mounts, run_folder, capsys, name):
    disk = mounts.full(leave=100 << 10)  # the export is 0.8 MB
    code, lines = run(capsys, "export", run_folder, disk / name)
    assert_one_error_line(code, lines, "export", disk / name, NO_SPACE, "free in")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temporary, no half file


# -- sample and generate --------------------------------------------------------------------------


def sample_args(checkpoint: str, vae: str, out: Path) -> list[str]:
    return [
        "sample", "--ckpt", checkpoint, "--vae", vae, "--output-dir", out,
        "--num-fid-samples", "12", "--batch-size", "4", "--num-steps", "2", "--shard-size", "4",
    ]  # fmt: skip


def test_sample_into_a_read_only_folder(mounts, tiny_checkpoint, tiny_vae_dir, capsys):
    ro = mounts.read_only()
    code, lines = run(capsys, *sample_args(tiny_checkpoint, tiny_vae_dir, ro / "batch"))
    assert_one_error_line(code, lines, "sample", ro / "batch", "Read-only file system")


def test_sample_on_a_full_disk_keeps_its_shards_and_continues(
    mounts, tiny_checkpoint, tiny_vae_dir, capsys
):
    # a shard of 4 images of 16 x 16 is 3.9 KB (one page), the manifest 1.5 KB: 12 KB free
    # takes the manifest and two of the three shards
    disk = mounts.full(leave=12 << 10)
    out = disk / "batch"
    code, lines = run(capsys, *sample_args(tiny_checkpoint, tiny_vae_dir, out))
    assert_one_error_line(code, lines, "sample", out / "shards", NO_SPACE)
    assert not temporaries(disk)
    done = len(list((out / "shards").glob("shard_*.npz")))
    assert 1 <= done < 3

    mounts.free_space(disk)
    assert cli.main([str(a) for a in sample_args(tiny_checkpoint, tiny_vae_dir, out)]) == 0
    left = f"{3 - done} shard{'s' * (3 - done > 1)} ({4 * (3 - done)} images) to sample"
    assert f"{done} shard{'s' * (done > 1)} ({4 * done} images) done, {left}" in (
        capsys.readouterr().out
    )
    assert (out / "samples_12.npz").is_file()


def generate_args(checkpoint: str, vae: str, out: Path) -> list[str]:
    return ["generate", "--ckpt", checkpoint, "--vae", vae, "--num", "4", "--num-steps", "2",
            "--out", out]  # fmt: skip


def test_generate_into_a_read_only_folder(mounts, tiny_checkpoint, tiny_vae_dir, capsys):
    ro = mounts.read_only()
    code, lines = run(capsys, *generate_args(tiny_checkpoint, tiny_vae_dir, ro / "grid.png"))
    assert_one_error_line(code, lines, "generate", ro, READ_ONLY)


def test_generate_on_a_full_disk(mounts, tiny_checkpoint, tiny_vae_dir, capsys):
    disk = mounts.full(leave=0)
    code, lines = run(capsys, *generate_args(tiny_checkpoint, tiny_vae_dir, disk / "grid.png"))
    assert_one_error_line(code, lines, "generate", disk / "grid.png", NO_SPACE)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# -- evaluate -------------------------------------------------------------------------------------


@pytest.fixture
def batches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "sample.npz", arr_0=images[::-1])
    return tmp_path / "ref.npz", tmp_path / "sample.npz"


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory) -> Path:
    from selfflow.eval.synthetic import inception_like_graph

    path = tmp_path_factory.mktemp("graph") / "inception_75.pb"
    path.write_bytes(
        inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    )
    return path


def test_evaluate_into_a_read_only_folder(mounts, batches, small_graph, capsys):
    ro = mounts.read_only()
    args = ["evaluate", *batches, ro / "eval", "--inception", small_graph, "--device", "cpu"]
    code, lines = run(capsys, *args)
    assert_one_error_line(code, lines, "evaluate", ro, READ_ONLY)


def test_evaluate_on_a_full_disk(mounts, batches, small_graph, capsys):
    disk = mounts.full(leave=0)
    (disk / "eval").mkdir()
    args = ["evaluate", *batches, disk / "eval", "--inception", small_graph, "--device", "cpu"]
    code, lines = run(capsys, *args)
    assert_one_error_line(code, lines, "evaluate", disk / "eval" / "metrics.json", NO_SPACE)
    assert list((disk / "eval").iterdir()) == []


# -- download -------------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch):
    from selfflow.base import download as dl
    from tests.eval.test_download import PAYLOAD, FileServer

    server = FileServer()
    server.files["/graph.pb"] = PAYLOAD
    monkeypatch.setattr(dl, "INCEPTION_URL", server.url("/graph.pb"))
    monkeypatch.setattr(dl.time, "sleep", lambda seconds: None)
    yield server
    server.close()


def test_download_into_a_read_only_cache(mounts, served, monkeypatch, capsys):
    ro = mounts.read_only()
    monkeypatch.setenv("SELFFLOW_CACHE", str(ro / "cache"))
    code, lines = run(capsys, "download", "inception")
    assert_one_error_line(code, lines, "download", ro, READ_ONLY)


def test_download_on_a_full_disk_keeps_the_bytes_and_resumes(mounts, served, monkeypatch, capsys):
    disk = mounts.full(leave=100 << 10)  # the file is 300 KB
    monkeypatch.setenv("SELFFLOW_CACHE", str(disk))
    code, lines = run(capsys, "download", "inception")
    part = disk / "classify_image_graph_def.pb.part"
    line = assert_one_error_line(code, lines, "download", part, NO_SPACE)
    assert line.startswith("selfflow download: error: cannot write")
    assert len(served.log) == 1  # a full disk is not retried like a network failure
    payload = served.files["/graph.pb"]
    received = part.read_bytes()
    assert 0 < len(received) < len(payload) and payload.startswith(received)

    mounts.free_space(disk)
    assert cli.main(["download", "inception"]) == 0
    assert (disk / "classify_image_graph_def.pb").read_bytes() == payload
    assert served.log[1] == ("/graph.pb", f"bytes={len(received)}-")  # resumed, not refetched
    assert not part.exists()


def test_a_log_line_cut_short_by_a_full_disk_does_not_stop_the_resume(tmp_path):
    from selfflow.train.watch import _truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    _truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
