"""`selfflow sample` end to end on the tiny model and tiny VAE (CPU).

The reference run (one process, batch 5, shards of 4) is compared with a two-process torchrun
run (batch 3), with a run killed by SIGKILL and re-run, with runs resumed from damaged or
partial folders, and its files are checked against independent readers (np.load, PIL).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfflow import cli
from selfflow.base import seeds
from selfflow.base.finite import NonFiniteSamplesError
from selfflow.base.npz import iter_npz_rows
from selfflow.batch.manifest import SAMPLING_REVISION
from selfflow.batch.runner import BatchConfig, generate_fid_batch

REPO = Path(__file__).resolve().parents[2]
N = 24


def sample_args(checkpoint, vae, out, *extra, n=N, batch=5, steps=4, shard=4):
    return [
        "--ckpt", str(checkpoint), "--vae", str(vae), "--output-dir", str(out),
        "--num-fid-samples", str(n), "--batch-size", str(batch), "--num-steps", str(steps),
        "--shard-size", str(shard), *extra,
    ]  # fmt: skip


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main(["sample", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load(folder: Path, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / f"samples_{n}.npz", allow_pickle=False) as npz:
        return npz["arr_0"], npz["arr_1"]


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float reordering: at most 1 level apart in at most 0.1 % of the values."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert (diff > 0).mean() <= 1e-3, f"{(diff > 0).mean():.2%} of values differ"


def expected_labels(seed: int, n: int) -> np.ndarray:
    # one call per index: the label of sample i must not depend on what else is drawn
    return np.array([int(seeds.uniform_labels(seed, [i])[0]) for i in range(n)])


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> Path:
    """One process, batch 5: the run everything else is compared with."""
    out = tmp_path_factory.mktemp("reference") / "samples"
    code = cli.main(
        [
            "sample",
            *sample_args(tiny_checkpoint, tiny_vae_dir, out, "--save-images", "--keep-shards"),
        ]
    )
    assert code == 0
    return out


# -- the files of a finished run ----------------------------------------------------------------


def test_output_folder_layout(reference):
    assert sorted(p.name for p in reference.iterdir()) == [
        "grid.png", "images", "manifest.json", "samples_24.npz", "shards",
    ]  # fmt: skip
    assert sorted(p.name for p in (reference / "shards").iterdir()) == [
        f"shard_{k:05d}.npz" for k in range(6)
    ]


def test_npz_holds_images_in_index_order_and_the_labels(reference):
    images, labels = load(reference)
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert images.std() > 5  # real pictures, not a constant
    np.testing.assert_array_equal(labels, expected_labels(31, N))
    # the streaming reader that parses the .npy header inside the zip agrees with np.load
    np.testing.assert_array_equal(
        np.concatenate(list(iter_npz_rows(reference / "samples_24.npz", rows_per_block=7))), images
    )
    # the uninterrupted run's shards hold exactly those images
    with np.load(reference / "shards" / "shard_00002.npz") as shard:
        np.testing.assert_array_equal(shard["images"], images[8:12])
        np.testing.assert_array_equal(shard["indices"], np.arange(8, 12))


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_each_sample_is_what_the_python_api_gives_for_its_index(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, mode
):
    """Not runner against runner: sample i of the batch equals SelfFlowPipeline(...)([label_i],
    indices=[i]) drawn on its own, and its label is uniform_labels(seed, [i])."""
    from selfflow.sampling.pipeline import SelfFlowPipeline

    seed, steps, picked = 31, 4, (0, 9, 23)
    folder = reference
    if mode == "ode":
        folder = tmp_path / "ode"
        code, _, err = run_cli(
            sample_args(tiny_checkpoint, tiny_vae_dir, folder, "--mode", "ODE", steps=steps),
            capsys,
        )
        assert code == 0, err
        assert (load(folder)[0] != load(reference)[0]).mean() > 0.5  # not the SDE's images
    images, labels = load(folder)
    pipe = SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")
    for i in picked:
        label = seeds.uniform_labels(seed, [i])
        assert labels[i] == int(label[0])
        alone = pipe([int(label[0])], indices=[i], seed=seed, num_steps=steps, mode=mode)[0]
        assert_same_images(alone[None], images[i][None])
    assert (images[picked[0]] != images[picked[1]]).mean() > 0.5  # the images differ by index


def test_pngs_are_named_by_global_index_and_hold_the_npz_images(reference):
    names = sorted(p.name for p in (reference / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(N)]
    images, _ = load(reference)
    for i in (0, 13, 23):
        np.testing.assert_array_equal(
            np.asarray(Image.open(reference / "images" / names[i])), images[i]
        )


def test_grid_shows_the_first_samples(reference):
    grid = np.asarray(Image.open(reference / "grid.png").convert("RGB"))
    images, _ = load(reference)
    assert grid.shape == (3 * 16 + 2 * 2, 8 * 16 + 7 * 2, 3)  # 24 images, 8 columns, 2 px gaps
    np.testing.assert_array_equal(grid[:16, :16], images[0])
    np.testing.assert_array_equal(grid[18:34, 18:34], images[9])


def test_manifest_records_every_image_setting(reference, tiny_checkpoint):
    manifest = json.loads((reference / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (
        settings["checkpoint_sha256"]
        == hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    )
    assert settings["vae"].startswith("local folder sha256:")
    expected = {
        "num_samples": N, "num_steps": 4, "mode": "sde", "solver": None, "seed": 31,
        "cfg_scale": 1.0, "guidance_low": None, "guidance_high": None, "class_balanced": False,
        "dtype": "float32", "network": "SelfFlowDiT/float32", "vae_dtype": "bfloat16",
    }  # fmt: skip
    assert {key: settings[key] for key in expected} == expected
    import selfflow

    # the code is identified by its sampling revision; the package version is only recorded
    assert settings["sampling_revision"] == SAMPLING_REVISION and "selfflow_version" not in settings
    assert manifest["info"]["selfflow_version"] == selfflow.__version__
    assert manifest["info"]["runs"][0]["selfflow_version"] == selfflow.__version__
    assert manifest["plan"] == {"num_samples": N, "shard_size": 4, "image_shape": [16, 16, 3]}
    assert manifest["complete"]["npz"] == "samples_24.npz"
    assert manifest["complete"]["bytes"] == (reference / "samples_24.npz").stat().st_size


# -- any number of processes, any batch size -----------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("torchrun") / "samples"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "sample.py"),
        *sample_args(tiny_checkpoint, tiny_vae_dir, out, "--keep-shards", batch=3),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, done.stderr


def test_torchrun_two_processes_match_one_process(reference, torchrun_run):
    out, stdout, stderr = torchrun_run
    assert "on 2 processes" in stdout
    assert "sampling: 100%" in stderr and "24/24" in stderr  # rank 0's bar counts both ranks
    assert not list(out.glob(".*"))  # no lock, shared-folder check file or temporary is left
    images, labels = load(out)
    ref_images, ref_labels = load(reference)
    np.testing.assert_array_equal(labels, ref_labels)
    assert_same_images(images, ref_images)


def run_two_ranks(mode: str, args_of_rank, as_two_nodes: bool = False, timeout: float = 120):
    """Two processes without torchrun (see two_ranks.py); returns [(returncode, stderr)]."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = subprocess_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0" if as_two_nodes else str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        command = [sys.executable, str(Path(__file__).with_name("two_ranks.py")), mode]
        processes.append(
            subprocess.Popen(
                [*command, *args_of_rank(rank)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
        )
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.stderr.close()


def test_two_nodes_that_do_not_share_the_output_folder_fail_at_once(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    """Each 'node' has its own folder under the same name: here, two folders."""
    folders = [tmp_path / "node0" / "samples", tmp_path / "node1" / "samples"]
    results = run_two_ranks(
        "plain",
        lambda rank: sample_args(tiny_checkpoint, tiny_vae_dir, folders[rank], n=4, batch=2),
        as_two_nodes=True,
    )
    for code, stderr in results:  # both nodes' logs say why
        assert code == 1
        line = stderr.strip().splitlines()[-1]
        assert "--output-dir must be on a filesystem all nodes share: rank 1 on " in line
    assert not list(folders[0].glob(".shared-check-*")) and not (folders[0] / "shards").exists()


def test_rank_zero_stops_with_the_reason_when_another_process_dies(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    started = time.monotonic()
    (code0, err0), (code1, _) = run_two_ranks(
        "die", lambda rank: sample_args(tiny_checkpoint, tiny_vae_dir, out, n=12, shard=2)
    )
    assert code1 == 3 and code0 == 1
    line = err0.strip().splitlines()[-1]
    assert "lost another process" in line and "rank 1 did not write shards 1, 3, 5" in line
    assert "run the same command again to continue" in line
    assert time.monotonic() - started < 60
    # rank 0's own shards are kept for the resume
    assert sorted(p.name for p in (out / "shards").glob("shard_*.npz")) == [
        "shard_00000.npz", "shard_00002.npz", "shard_00004.npz",
    ]  # fmt: skip


def test_resume_with_another_process_count_and_batch_size(
    reference, torchrun_run, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    """Shards 0, 1 and 3 made by two processes with batch 3; the rest by one with batch 7."""
    source, _, _ = torchrun_run
    out = tmp_path / "samples"
    (out / "shards").mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["complete"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    for k in (0, 1, 3):
        shutil.copy(source / "shards" / f"shard_{k:05d}.npz", out / "shards")
    code, stdout, _ = run_cli(sample_args(tiny_checkpoint, tiny_vae_dir, out, batch=7), capsys)
    assert code == 0
    assert "3 shards (12 images) done, 3 shards (12 images) to sample" in stdout
    assert "(12 sampled now)" in stdout
    assert_same_images(load(out)[0], load(reference)[0])
    assert not (out / "shards").exists()  # removed once the npz is written


# -- killed and resumed ---------------------------------------------------------------------------


def test_sigkill_then_same_command_gives_a_byte_identical_arr_0(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    def command(out):
        return [
            sys.executable, str(REPO / "sample.py"),
            *sample_args(tiny_checkpoint, tiny_vae_dir, out, n=480, batch=4, shard=8),
        ]  # fmt: skip

    env = subprocess_env()
    logs = [open(tmp_path / name, "w") for name in ("ref.log", "victim.log")]  # noqa: SIM115
    try:
        uninterrupted = subprocess.Popen(
            command(tmp_path / "ref"), stdout=logs[0], stderr=subprocess.STDOUT, env=env
        )
        victim = subprocess.Popen(
            command(tmp_path / "victim"), stdout=logs[1], stderr=subprocess.STDOUT, env=env
        )
        shards = tmp_path / "victim" / "shards"
        deadline = time.monotonic() + 240
        while not (shards.is_dir() and any(p.name.startswith("shard_") for p in shards.iterdir())):
            assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        assert uninterrupted.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    finally:
        for log in logs:
            log.close()
    finished = [p for p in shards.iterdir() if p.name.startswith("shard_")]
    assert 0 < len(finished) < 60, "the run was not interrupted in the middle"
    assert not (tmp_path / "victim" / "samples_480.npz").exists()

    rerun = subprocess.run(
        command(tmp_path / "victim"), capture_output=True, text=True, env=env, timeout=240
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = re.search(r"shards of 8: \d+ shards? \((\d+) images?\) done", rerun.stdout)
    done_before = int(resumed.group(1))
    assert done_before >= 8 * len(finished) - 8  # it continued, it did not start over
    with (
        zipfile.ZipFile(tmp_path / "ref" / "samples_480.npz") as a,
        zipfile.ZipFile(tmp_path / "victim" / "samples_480.npz") as b,
    ):
        assert a.read("arr_0.npy") == b.read("arr_0.npy")
        assert a.read("arr_1.npy") == b.read("arr_1.npy")
    assert not [p for p in (tmp_path / "victim").rglob("*") if ".tmp-" in p.name]


def test_damaged_shards_and_temporaries_are_redone(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    (out / "samples_24.npz").unlink()
    truncated = out / "shards" / "shard_00002.npz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    flipped = out / "shards" / "shard_00004.npz"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    flipped.write_bytes(bytes(raw))
    (out / "shards" / ".shard_00005.npz.tmp-4242").write_bytes(b"half")
    (out / "images" / "000013.png").unlink()
    code, stdout, _ = run_cli(
        sample_args(tiny_checkpoint, tiny_vae_dir, out, "--save-images", "--keep-shards"), capsys
    )
    assert code == 0
    assert "removed 1 temporary files" in stdout
    assert (
        "shard 2 (samples 8…11) is redone" in stdout
        and "shard 4 (samples 16…19) is redone" in stdout
    )
    assert "4 shards (16 images) done, 2 shards (8 images) to sample" in stdout
    np.testing.assert_array_equal(load(out)[0], load(reference)[0])
    assert (out / "images" / "000013.png").exists()


def test_rerunning_a_finished_command_does_nothing(
    reference, tiny_checkpoint, tiny_vae_dir, capsys
):
    before = (reference / "samples_24.npz").stat().st_mtime_ns
    code, stdout, _ = run_cli(
        sample_args(tiny_checkpoint, tiny_vae_dir, reference, "--save-images", "--keep-shards"),
        capsys,
    )
    assert code == 0
    assert "already complete" in stdout
    assert (reference / "samples_24.npz").stat().st_mtime_ns == before


# -- other settings: refused, or started over ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--seed", "32"], "seed: 31 in the folder, 32 now"),
        (["--num-steps", "5"], "num_steps: 4 in the folder, 5 now"),
    ],
)
def test_rerun_with_other_settings_is_refused(
    reference, tiny_checkpoint, tiny_vae_dir, capsys, extra, named
):
    manifest = (reference / "manifest.json").read_text()
    args = sample_args(tiny_checkpoint, tiny_vae_dir, reference)
    if "--num-steps" in extra:
        args = sample_args(tiny_checkpoint, tiny_vae_dir, reference, steps=5)
    else:
        args += extra
    code, _, err = run_cli(args, capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("selfflow sample: error:") and named in line and "--overwrite" in line
    assert (reference / "manifest.json").read_text() == manifest


def _half_finished_copy(reference: Path, out: Path) -> dict:
    """The reference folder with its npz and its last two shards gone; returns its manifest."""
    shutil.copytree(reference, out)
    (out / "samples_24.npz").unlink()
    for k in (4, 5):
        (out / "shards" / f"shard_{k:05d}.npz").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = None
    return manifest


def test_a_bf16_resume_at_another_batch_size_says_the_images_round_differently(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    bf16 = ("--dtype", "bfloat16", "--keep-shards")
    code, _, err = run_cli(sample_args(tiny_checkpoint, tiny_vae_dir, out, *bf16), capsys)
    assert code == 0, err

    def resume(batch: int) -> str:
        (out / f"samples_{N}.npz").unlink()
        (out / "shards" / "shard_00005.npz").unlink()
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["complete"] = None
        (out / "manifest.json").write_text(json.dumps(manifest))
        args = sample_args(tiny_checkpoint, tiny_vae_dir, out, *bf16, batch=batch)
        code, stdout, err = run_cli(args, capsys)
        assert code == 0, err
        assert "5 shards (20 images) done, 1 shard (4 images) to sample" in stdout
        return stdout

    assert "note:" not in resume(5)
    note = resume(3)
    assert "begun with --batch-size 5" in note and "--batch-size 3" in note


def test_a_folder_begun_by_another_package_version_resumes(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, monkeypatch
):
    from selfflow.base import version

    out = tmp_path / "samples"
    manifest = _half_finished_copy(reference, out)
    manifest["info"]["selfflow_version"] = "0.0.1"
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(version, "__version__", "99.0")
    code, stdout, err = run_cli(sample_args(tiny_checkpoint, tiny_vae_dir, out), capsys)
    assert code == 0, err
    assert "4 shards (16 images) done, 2 shards (8 images) to sample" in stdout
    np.testing.assert_array_equal(load(out)[0], load(reference)[0])
    info = json.loads((out / "manifest.json").read_text())["info"]
    assert info["selfflow_version"] == "0.0.1" and info["runs"][-1]["selfflow_version"] == "99.0"


def test_a_folder_of_another_sampling_revision_is_refused(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    manifest = _half_finished_copy(reference, out)
    manifest["settings"]["sampling_revision"] = 0
    manifest["info"]["selfflow_version"] = "0.0.1"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in (out / "shards").iterdir())
    code, _, err = run_cli(sample_args(tiny_checkpoint, tiny_vae_dir, out), capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert f"sampling_revision: 0 in the folder, {SAMPLING_REVISION} now" in line
    assert "selfflow 0.0.1" in line and "--overwrite" in line
    assert sorted(p.name for p in (out / "shards").iterdir()) == before


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_ends(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    import fcntl

    out = tmp_path / "samples"
    manifest = _half_finished_copy(reference, out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    in_flight = out / "shards" / ".shard_00004.npz.tmp-4242"  # the other run's shard in flight
    in_flight.write_bytes(b"half")
    args = sample_args(tiny_checkpoint, tiny_vae_dir, out, "--overwrite")
    with open(out / ".lock", "w") as other_run:  # what a running `selfflow sample` holds
        fcntl.flock(other_run, fcntl.LOCK_EX)
        # what a running `selfflow sample` writes into the lock file
        other_run.write(
            '{"command": "selfflow sample", "pid": 4242, "host": "elsewhere", '
            '"started": "2026-12-06 17:00:00 UTC"}\n'
        )
        other_run.flush()
        code, _, err = run_cli(args, capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.endswith(
        f"{out} is in use by `selfflow sample` (pid 4242 on elsewhere, started 2026-12-06 "
        "17:00:00 UTC); wait for it to end or stop it, or choose another --output-dir"
    )
    assert in_flight.exists() and len(list((out / "shards").glob("shard_*.npz"))) == 4
    # the lock ended with its process; the file it leaves behind does not block the next run
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "--overwrite: removed" in stdout and not in_flight.exists()
    assert not (out / ".lock").exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path, tiny_checkpoint, tiny_vae_dir, capsys):
    out = tmp_path / "samples"
    out.mkdir()  # a folder the run did not create stays (one it created is removed)
    code, _, err = run_cli(sample_args(tmp_path / "missing.pt", tiny_vae_dir, out), capsys)
    assert code == 1 and "checkpoint not found" in err
    from selfflow.base.lock import FolderLock

    with FolderLock(out) as lock:  # free again, in this same process
        holder = json.loads((out / ".lock").read_text())
        assert lock.held and holder["pid"] == os.getpid() and holder["command"] == "selfflow sample"
    assert not (out / ".lock").exists()


def test_overwrite_starts_over(reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    # --overwrite deletes nothing until the new checkpoint and VAE have loaded
    code, _, err = run_cli(
        sample_args(tmp_path / "missing.pt", tiny_vae_dir, out, "--overwrite"), capsys
    )
    assert code == 1 and "checkpoint not found" in err
    assert (out / "samples_24.npz").exists() and len(list((out / "images").glob("*.png"))) == N
    code, stdout, _ = run_cli(
        sample_args(tiny_checkpoint, tiny_vae_dir, out, "--seed", "32", "--overwrite"), capsys
    )
    assert code == 0
    assert (
        "--overwrite: removed" in stdout
        and f"of 4: {N // 4} shards ({N} images) to sample" in stdout
    )
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 32
    images, labels = load(out)
    np.testing.assert_array_equal(labels, expected_labels(32, N))
    assert (images != load(reference)[0]).mean() > 0.5
    assert not list((out / "images").glob("*.png"))  # the seed-31 PNGs are gone
    assert (out / "notes.txt").read_text() == "mine"  # what is not ours stays


# -- options ------------------------------------------------------------------------------------


def test_official_mode_spelling_ode_and_the_bf16_path(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    args = sample_args(
        tiny_checkpoint, tiny_vae_dir, tmp_path / "ode", "--mode", "ODE", "--solver", "euler",
        "--dtype", "bfloat16", n=4, batch=4, steps=3,
    )  # fmt: skip
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0, stdout
    settings = json.loads((tmp_path / "ode" / "manifest.json").read_text())["settings"]
    assert (settings["mode"], settings["solver"], settings["dtype"]) == ("ode", "euler", "bfloat16")
    assert settings["network"] == "FastSelfFlow/bfloat16"
    assert load(tmp_path / "ode", 4)[0].shape == (4, 16, 16, 3)


def test_class_balanced_gives_each_class_once_per_thousand(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "balanced"
    code, _, _ = run_cli(
        sample_args(
            tiny_checkpoint,
            tiny_vae_dir,
            out,
            "--class-balanced",
            n=1000,
            batch=250,
            steps=2,
            shard=250,
        ),
        capsys,
    )
    assert code == 0
    _, labels = load(out, 1000)
    assert np.array_equal(np.sort(labels), np.arange(1000))
    np.testing.assert_array_equal(labels, seeds.balanced_labels(31, 1000))
    assert json.loads((out / "manifest.json").read_text())["settings"]["class_balanced"] is True


# -- bad input: one clear line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"--num-fid-samples": "0"},
            "--num-fid-samples must be a positive number of images; got 0",
        ),
        (
            {"--num-fid-samples": "-5"},
            "--num-fid-samples must be a positive number of images; got -5",
        ),
        (
            {"--batch-size": "0"},
            "--batch-size must be a positive number of images per process; got 0",
        ),
        ({"--num-steps": "1"}, "--num-steps must be at least 2; got 1"),
        (
            {"--guidance-low": "0.8", "--guidance-high": "0.5"},
            "--guidance-low (0.8) must not exceed --guidance-high (0.5)",
        ),
        ({"--cfg-scale": "-1"}, "--cfg-scale must be >= 0 and finite"),
        ({"--shard-size": "0"}, "--shard-size must be a positive number of images; got 0"),
        ({"--class-balanced": None}, "divisible by 1000"),
        ({"--device": "cuda:99"}, "cuda"),
        ({"--inception": "{tmp}/graph.pb"}, "--inception {tmp}/graph.pb: no such file"),
        ({"--eval-ref": "{tmp}/ref.npz"}, "--eval-ref {tmp}/ref.npz: no such file"),
        ({"--output-dir": "{tmp}/a_file"}, "is a file; expected a folder"),
        (
            {"--output-dir": "/sys/selfflow-samples"},
            "cannot create --output-dir /sys/selfflow-samples",
        ),
        ({"--output-dir": "/sys"}, "--output-dir /sys is not writable"),
        ({"--ckpt": "{tmp}/missing.pt"}, "checkpoint not found: {tmp}/missing.pt"),
        ({"--ckpt": "{tmp}/truncated.pt"}, "truncated.pt is not a readable PyTorch checkpoint"),
        ({"--ckpt": "{tmp}/wrong.pt"}, "does not match the Self-Flow model"),
    ],
)
def test_bad_input_gets_one_clear_line(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, change, message
):
    import torch

    (tmp_path / "a_file").write_text("not a folder, not a checkpoint")
    torch.save({"pos_embed": torch.zeros(1, 16, 64)}, tmp_path / "wrong.pt")
    (tmp_path / "truncated.pt").write_bytes(Path(tiny_checkpoint).read_bytes()[:5000])
    options = dict(
        zip(*[iter(sample_args(tiny_checkpoint, tiny_vae_dir, tmp_path / "out"))] * 2, strict=True)
    )
    for key, value in change.items():
        options[key] = value.format(tmp=tmp_path) if value else None
    args = [
        item
        for key, value in options.items()
        for item in ((key,) if value is None else (key, value))
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("selfflow sample: error: ")
    assert message.format(tmp=tmp_path) in line
    assert not (tmp_path / "out" / "samples_24.npz").exists()


# -- the Python API: non-finite samples, the background writer, --eval-ref ----------------------


def _config(checkpoint, vae, out, **changes) -> BatchConfig:
    values = dict(
        checkpoint=checkpoint, vae=vae, output_dir=out, num_samples=12, batch_size=4,
        num_steps=3, shard_size=2, save_images=True,
    )  # fmt: skip
    values.update(changes)
    return BatchConfig(**values)


def poison_label(poison: int):
    """A prepare_pipeline hook whose network returns NaN for every sample of label ``poison``."""

    def hook(pipe):
        inner = pipe.model_fn

        def poisoned(x, tau, y):
            out = inner(x, tau, y).clone()
            out[y == poison] = float("nan")
            return out

        pipe.model_fn = poisoned

    return hook


def test_non_finite_samples_stop_the_run_with_their_indices(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    labels = expected_labels(31, 12)
    poison = int(labels[6])
    bad = np.flatnonzero(labels == poison)
    first_bad_batch = bad[0] // 4
    expected = [int(i) for i in bad if i // 4 == first_bad_batch]

    hook = poison_label(poison)

    out = tmp_path / "samples"
    with pytest.raises(NonFiniteSamplesError) as caught:
        generate_fid_batch(
            _config(tiny_checkpoint, tiny_vae_dir, out), prepare_pipeline=hook, progress=False
        )
    assert caught.value.indices == expected
    assert f"sample indices [{', '.join(map(str, expected))}]" in str(caught.value)
    assert not (out / "samples_12.npz").exists() and not (out / "grid.png").exists()
    for path in (out / "shards").glob("shard_*.npz"):  # what was written holds no bad sample
        with np.load(path) as shard:
            assert not np.isin(shard["indices"], bad).any()
    assert not [i for i in bad if (out / "images" / f"{i:06d}.png").exists()]


def test_a_short_last_batch_is_padded_to_the_batch_size_and_the_padding_dropped(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir
):
    """7 images in batches of 5: the network only ever sees batches of 5 (one compiled shape),
    and the 3 padding rows of the second batch reach neither the shards nor the npz."""
    calls = []

    def hook(pipe):
        inner = pipe.model_fn

        def recording(x, tau, y):
            calls.append(y.tolist())
            return inner(x, tau, y)

        pipe.model_fn = recording

    out = tmp_path / "samples"
    config = _config(tiny_checkpoint, tiny_vae_dir, out, num_samples=7, batch_size=5,
                     num_steps=4, shard_size=4, save_images=False, keep_shards=True)  # fmt: skip
    generate_fid_batch(config, prepare_pipeline=hook, progress=False)
    assert calls and {len(y) for y in calls} == {5}
    labels = expected_labels(31, 7)
    assert calls[-1] == [*labels[5:7], labels[6], labels[6], labels[6]]  # repeats of the last
    images, got_labels = load(out, 7)
    np.testing.assert_array_equal(got_labels, labels)
    # the same images as the reference run of 24 (in batches of 5)
    assert_same_images(images, load(reference)[0][:7])
    with np.load(out / "shards" / "shard_00001.npz") as shard:
        np.testing.assert_array_equal(shard["indices"], [4, 5, 6])


@pytest.mark.parametrize("compiled", [True, False])
def test_a_compiled_network_is_announced_before_the_first_batch(
    tmp_path, tiny_checkpoint, tiny_vae_dir, compiled
):
    events = []

    class Network:
        """The network, flagged as selfflow.model.inference flags a torch.compile'd one."""

        def __init__(self, inner):
            self.inner, self.compiled = inner, compiled

        def __call__(self, x, tau, y):
            events.append("network call")
            return self.inner(x, tau, y)

    def hook(pipe):
        pipe.model_fn = Network(pipe.model_fn)

    config = _config(tiny_checkpoint, tiny_vae_dir, tmp_path / "s", num_samples=7, batch_size=5,
                     num_steps=2, save_images=False)  # fmt: skip
    generate_fid_batch(config, prepare_pipeline=hook, progress=False, log=events.append)
    notices = [e for e in events if e.startswith("compiling")]
    if compiled:
        assert len(notices) == 1 and "batch 5" in notices[0]
        assert events.index(notices[0]) < events.index("network call")
    else:
        assert notices == [] and "network call" in events


def test_non_finite_padding_rows_are_not_reported(tmp_path, tiny_checkpoint, tiny_vae_dir):
    """The last sample goes bad, so do its padding copies; the error names each sample once."""
    labels = expected_labels(31, 7)
    poison = int(labels[6])
    bad = np.flatnonzero(labels == poison)
    expected = [int(i) for i in bad if i // 5 == bad[0] // 5]

    hook = poison_label(poison)

    config = _config(tiny_checkpoint, tiny_vae_dir, tmp_path / "s", num_samples=7, batch_size=5,
                     num_steps=3, shard_size=4, save_images=False)  # fmt: skip
    with pytest.raises(NonFiniteSamplesError) as caught:
        generate_fid_batch(config, prepare_pipeline=hook, progress=False)
    assert caught.value.indices == expected


def test_non_finite_decoded_images_name_their_indices(tmp_path, tiny_checkpoint, tiny_vae_dir):
    import torch

    from selfflow.model.checkpoint import load_model
    from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline

    # Independently, the latents of each batch of 4 (the run's batches): the fake decoder fails
    # on rows whose first latent value is positive.
    plain = SelfFlowPipeline(load_model(tiny_checkpoint), None, device="cpu")
    settings = SamplerSettings(3, "sde", "heun", 1.0, (0.0, 0.7))
    expected = []
    for start in range(0, 12, 4):
        idx = list(range(start, start + 4))
        latents = plain.sample_latents(
            torch.from_numpy(expected_labels(31, 12)[idx]), idx, 31, settings
        )
        rows = np.flatnonzero(latents.flatten(1)[:, 0].numpy() > 0)
        if len(rows):
            expected = [start + int(r) for r in rows]
            break
    assert expected

    def hook(pipe):
        decode = pipe.decode

        def failing(latents):  # fails as the real decoder does, naming batch rows
            rows = (latents.flatten(1)[:, 0] > 0).nonzero().flatten().tolist()
            if rows:
                raise NonFiniteSamplesError(rows, "decoding", what="batch rows")
            return decode(latents)

        pipe.decode = failing

    out = tmp_path / "samples"
    config = _config(tiny_checkpoint, tiny_vae_dir, out, shard_size=4)
    with pytest.raises(NonFiniteSamplesError, match="decoding produced NaN") as caught:
        generate_fid_batch(config, prepare_pipeline=hook, progress=False)
    assert caught.value.indices == expected
    assert not (out / "samples_12.npz").exists()


def test_decoding_and_writing_overlap_the_next_batch_with_a_bounded_queue(
    tmp_path, tiny_checkpoint, tiny_vae_dir
):
    steps, batch, n = 3, 2, 24
    state = {"calls": 0, "decodes": 0, "ahead": 0}
    next_batch_started = threading.Event()
    overlapped = []

    def hook(pipe):
        inner, decode = pipe.model_fn, pipe.decode

        def counting(x, tau, y):
            state["calls"] += 1
            started = -(-state["calls"] // steps)  # batches whose sampling has begun
            state["ahead"] = max(state["ahead"], started - state["decodes"])
            if state["calls"] > steps:
                next_batch_started.set()
            return inner(x, tau, y)

        def slow(latents):
            if threading.current_thread() is threading.main_thread():
                return decode(latents)  # the set-up's one-latent probe of the image size
            state["decodes"] += 1
            if state["decodes"] == 1:
                # Finishes only if the sampler goes on with batch 2 meanwhile.
                overlapped.append(next_batch_started.wait(timeout=30))
            time.sleep(0.05)
            return decode(latents)

        pipe.model_fn, pipe.decode = counting, slow

    config = _config(tiny_checkpoint, tiny_vae_dir, tmp_path / "s", num_samples=n, batch_size=batch,
                     num_steps=steps, shard_size=4, save_images=False)  # fmt: skip
    result = generate_fid_batch(config, prepare_pipeline=hook, progress=False)
    assert overlapped == [True]
    # queue of 2: at most one batch decoding, two queued and one being sampled
    assert 2 <= state["ahead"] <= 4, state
    assert result.new_samples == n and load(tmp_path / "s", n)[0].shape == (n, 16, 16, 3)


def test_eval_ref_evaluates_the_finished_batch(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, monkeypatch
):
    from selfflow.eval import evaluator

    calls = {}

    def evaluate(ref_path, sample_path, out_dir=None, inception=None, device=None, batch_size=64):
        calls.update(ref=ref_path, sample=sample_path, out_dir=out_dir, inception=inception,
                     exists=Path(sample_path).is_file())  # fmt: skip
        return {"fid": 1.25}

    monkeypatch.setattr(evaluator, "evaluate", evaluate)
    monkeypatch.setattr(evaluator, "format_report", lambda metrics: f"FID: {metrics['fid']}")
    ref, graph = tmp_path / "ref.npz", tmp_path / "graph.pb"
    ref.write_bytes(b"x")
    graph.write_bytes(b"x")
    out = tmp_path / "samples"
    args = sample_args(
        tiny_checkpoint,
        tiny_vae_dir,
        out,
        "--eval-ref",
        str(ref),
        "--inception",
        str(graph),
        n=4,
        batch=4,
    )
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "FID: 1.25" in stdout
    assert calls == {"ref": str(ref), "sample": str(out / "samples_4.npz"), "out_dir": str(out),
                     "inception": str(graph), "exists": True}  # fmt: skip


def test_eval_ref_runs_the_real_evaluator(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, monkeypatch
):
    """The finished batch against itself, through ADM's metrics on a small synthetic Inception graph:
    every sample lies within its own neighbourhood radius, so precision and recall are 1."""
    from selfflow.eval.synthetic import inception_like_graph

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    graph = tmp_path / "inception.pb"
    graph.write_bytes(
        inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    )
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    ref = shutil.copy(reference / "samples_24.npz", tmp_path / "ref.npz")
    args = sample_args(
        tiny_checkpoint, tiny_vae_dir, out, "--eval-ref", str(ref), "--inception", str(graph)
    )
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    lines = [
        line for line in stdout.splitlines() if ": " in line and not line.startswith("selfflow")
    ]
    names = [line.split(":")[0] for line in lines[-5:]]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    values = {line.split(": ")[0]: float(line.split(": ")[1]) for line in lines[-5:]}
    assert values["Precision"] == 1.0 and values["Recall"] == 1.0
    assert abs(values["FID"]) < 1e-3
    assert (out / "metrics.json").is_file()


def test_missing_pngs_of_a_finished_batch_are_written_from_the_npz(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "shards")
    for i in (3, 17):
        (out / "images" / f"{i:06d}.png").unlink()
    (out / "grid.png").unlink()
    code, stdout, _ = run_cli(
        sample_args(tiny_checkpoint, tiny_vae_dir, out, "--save-images"), capsys
    )
    assert code == 0 and "already complete" in stdout and "wrote 2 missing PNGs" in stdout
    images, _ = load(out)
    for i in (3, 17):
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "images" / f"{i:06d}.png")), images[i]
        )
    assert (out / "grid.png").exists()


def test_shard_files_without_a_manifest_are_refused(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    out = tmp_path / "samples"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard_00000.npz").write_bytes(b"?")
    code, _, err = run_cli(sample_args(tiny_checkpoint, tiny_vae_dir, out), capsys)
    assert code == 1 and "holds shard files but no manifest.json" in err
    assert (out / "shards" / "shard_00000.npz").exists()
