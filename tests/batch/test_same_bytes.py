"""Same bytes however the work is cut: a short last batch, a resume that redoes shards, one
sample drawn alone through the Python API, at one --batch-size (tiny model and VAE, CPU).

Kernels round differently per batch shape (the bf16 VAE most visibly), and at one shape a row
does not depend on its neighbours. So the network must always see --batch-size rows (or N if
fewer) and the VAE always ``DECODE_BATCH`` latents; then the bytes are a function of
(seed, index, settings, --batch-size) alone, and are compared here with np.array_equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from selfflow import cli
from selfflow.base import seeds
from selfflow.batch.runner import BatchConfig, generate_fid_batch
from selfflow.model import vae

N, BATCH, SHARD, STEPS = 24, 5, 4, 4


def run(checkpoint, vae_dir, out: Path, n: int, dtype: str, batch: int = BATCH, hook=None):
    config = BatchConfig(
        checkpoint=checkpoint, vae=vae_dir, output_dir=out, num_samples=n, batch_size=batch,
        num_steps=STEPS, shard_size=SHARD, dtype=dtype, keep_shards=True,
    )  # fmt: skip
    messages: list[str] = []
    generate_fid_batch(config, prepare_pipeline=hook, progress=False, log=messages.append)
    return messages


def images(folder: Path, n: int) -> np.ndarray:
    with np.load(folder / f"samples_{n}.npz", allow_pickle=False) as npz:
        return npz["arr_0"]


def unfinish(folder: Path, n: int, damaged: tuple[int, ...]) -> None:
    """Remove the npz, mark the run unfinished and damage the given shards (as a crash would)."""
    (folder / f"samples_{n}.npz").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["complete"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for k in damaged:
        shard = folder / "shards" / f"shard_{k:05d}.npz"
        shard.write_bytes(shard.read_bytes()[:200])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def reference(request, tmp_path_factory, tiny_checkpoint, tiny_vae_dir):
    out = tmp_path_factory.mktemp(f"same-bytes-{request.param}") / "samples"
    run(tiny_checkpoint, tiny_vae_dir, out, N, request.param)
    return request.param, out


def test_the_network_and_the_decoder_always_see_one_shape(tmp_path, tiny_checkpoint, tiny_vae_dir):
    """12 images in batches of 5 (a short last batch of 2), then a resume that redoes one shard
    of 4: every network call has 5 rows, every decoder call DECODE_BATCH latents."""
    network, decoder = [], []

    def hook(pipe):
        model_fn, decode = pipe.model_fn, pipe.autoencoder.decode

        def recording_network(x, tau, y):
            network.append(x.shape[0])
            return model_fn(x, tau, y)

        def recording_decode(z, *args, **kwargs):
            decoder.append(z.shape[0])
            return decode(z, *args, **kwargs)

        pipe.model_fn = recording_network
        pipe.autoencoder.decode = recording_decode

    out = tmp_path / "samples"
    run(tiny_checkpoint, tiny_vae_dir, out, 12, "float32", hook=hook)
    assert network and set(network) == {BATCH}
    assert decoder and set(decoder) == {vae.DECODE_BATCH}
    network.clear()
    decoder.clear()
    unfinish(out, 12, damaged=(2,))
    run(tiny_checkpoint, tiny_vae_dir, out, 12, "float32", hook=hook)
    assert len(network) == STEPS and set(network) == {BATCH}  # one padded batch for 4 images
    assert decoder and set(decoder) == {vae.DECODE_BATCH}


def test_a_short_last_batch_gives_the_bytes_of_a_full_one(reference, tmp_path, tiny_checkpoint,
                                                          tiny_vae_dir):  # fmt: skip
    """6, 11, 16 or 21 images: the last batch holds one sample alone; 22: samples 20 and 21."""
    dtype, folder = reference
    for n in (6, 11, 16, 21, 22):
        out = tmp_path / f"n{n}"
        run(tiny_checkpoint, tiny_vae_dir, out, n, dtype)
        np.testing.assert_array_equal(images(out, n), images(folder, N)[:n])


@pytest.mark.parametrize("damaged", [(1, 5), (5,), (0, 2, 3, 5)])
def test_a_resume_that_redoes_shards_gives_the_bytes_of_one_run(
    reference, tmp_path, tiny_checkpoint, tiny_vae_dir, damaged
):
    """Damaged shards of 4 are redone together, in batches with other neighbours than in the
    uninterrupted run, the last one short (one shard alone: 4 samples in a batch of 5; four
    shards: sample 23 alone in the last batch)."""
    dtype, folder = reference
    out = tmp_path / "samples"
    shutil.copytree(folder, out)
    unfinish(out, N, damaged=damaged)
    messages = run(tiny_checkpoint, tiny_vae_dir, out, N, dtype)
    left = len(damaged)
    done = f"{N // SHARD - left} shards ({N - SHARD * left} images) done"
    redo = f"{left} shard{'s' * (left > 1)} ({SHARD * left} images) to sample"
    assert any(f"{done}, {redo}" in m for m in messages), messages
    assert not [m for m in messages if m.startswith("note:")]
    np.testing.assert_array_equal(images(out, N), images(folder, N))


def test_a_sample_drawn_alone_through_the_python_api_has_the_bytes_of_the_batch(
    reference, tiny_checkpoint, tiny_vae_dir
):
    import torch

    from selfflow.sampling.pipeline import SelfFlowPipeline

    dtype, folder = reference
    batch = images(folder, N)
    pipe = SelfFlowPipeline.from_pretrained(
        tiny_checkpoint, tiny_vae_dir, device="cpu", dtype=getattr(torch, dtype)
    )
    for i in (0, 7, 13, 23):
        label = int(seeds.uniform_labels(31, [i])[0])
        alone = pipe([label], indices=[i], seed=31, num_steps=STEPS, batch_size=BATCH)
        np.testing.assert_array_equal(alone[0], batch[i])
    # and several at once, in another order, cut into other calls
    order = [23, 2, 17, 9, 4, 11, 0]
    labels = [int(seeds.uniform_labels(31, [i])[0]) for i in order]
    several = pipe(labels, indices=order, seed=31, num_steps=STEPS, batch_size=BATCH)
    np.testing.assert_array_equal(several, batch[order])


def test_a_float32_resume_at_another_batch_size_says_the_bytes_may_differ(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys
):
    """float32 is not exempt: the network's last bits change with the batch shape and the bf16
    VAE can turn them into a level. The same shape (any --batch-size >= N) is not a change."""
    out = tmp_path / "samples"
    run(tiny_checkpoint, tiny_vae_dir, out, 8, "float32", batch=3)
    unfinish(out, 8, damaged=(1,))
    note = [
        m for m in run(tiny_checkpoint, tiny_vae_dir, out, 8, "float32", batch=5) if "note:" in m
    ]
    assert len(note) == 1 and "--batch-size 3" in note[0] and "--batch-size 5" in note[0]
    out = tmp_path / "large"
    run(tiny_checkpoint, tiny_vae_dir, out, 8, "float32", batch=8)
    unfinish(out, 8, damaged=(1,))
    messages = run(
        tiny_checkpoint, tiny_vae_dir, out, 8, "float32", batch=64
    )  # still one batch of 8
    assert not [m for m in messages if "note:" in m]


def test_sample_help_promises_exactly_this(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "At one --batch-size the images are byte-identical" in text
    assert "another --batch-size rounds differently" in text
    assert "up to floating-point rounding (at most 1 level in a few pixels)" not in text


@pytest.mark.slow
def test_two_processes_give_the_bytes_of_one(tmp_path, tiny_checkpoint, tiny_vae_dir):
    """torchrun, 2 processes, 12 images in shards of 2 and batches of 5: each process holds 6
    images (a batch of 5 and one of 1, with other neighbours than in one process)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(repo / "sample.py"), "--ckpt", tiny_checkpoint, "--vae", tiny_vae_dir,
        "--output-dir", str(out), "--num-fid-samples", "12", "--batch-size", str(BATCH),
        "--num-steps", str(STEPS), "--shard-size", "2", "--dtype", "bfloat16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stdout
    one = tmp_path / "one"
    config = BatchConfig(
        checkpoint=tiny_checkpoint, vae=tiny_vae_dir, output_dir=one, num_samples=12,
        batch_size=BATCH, num_steps=STEPS, shard_size=2, dtype="bfloat16",
    )  # fmt: skip
    generate_fid_batch(config, progress=False, log=lambda message: None)
    np.testing.assert_array_equal(images(out, 12), images(one, 12))
