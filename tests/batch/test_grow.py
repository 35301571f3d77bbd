"""Growing a finished run, and the sha256 of the finished npz (tiny model and VAE, CPU).

A folder holding a finished run of 64 asked for 80 must sample only 16 and give the bytes of a
fresh run of 80; a bit flipped in a finished npz must not pass as "already complete".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from selfflow.base.errors import ConfigurationError
from selfflow.batch.runner import BatchConfig, generate_fid_batch


def _config(checkpoint, vae, out, n, **changes) -> BatchConfig:
    # batch 8 divides 64 and 16: the grown run's batches are exactly those of a fresh run
    values = dict(checkpoint=checkpoint, vae=vae, output_dir=out, num_samples=n, batch_size=8,
                  num_steps=3)  # fmt: skip
    values.update(changes)
    return BatchConfig(**values)


def _recorder(seen: list[int]):
    """A prepare_pipeline hook that records the sample indices the sampler is asked for."""

    def hook(pipe):
        inner = pipe.sample_latents

        def recording(labels, indices, seed, settings, **options):
            seen.extend(indices)
            return inner(labels, indices, seed, settings, **options)

        pipe.sample_latents = recording

    return hook


def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(scope="module")
def fresh_80(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> Path:
    out = tmp_path_factory.mktemp("fresh") / "samples"
    generate_fid_batch(_config(tiny_checkpoint, tiny_vae_dir, out, 80), progress=False)
    return out


@pytest.fixture(scope="module")
def finished_64(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "samples"
    generate_fid_batch(_config(tiny_checkpoint, tiny_vae_dir, out, 64), progress=False)
    return out


def test_growing_a_finished_64_to_80_samples_16_and_equals_a_fresh_80(
    fresh_80, finished_64, tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    shutil.copytree(finished_64, out)
    seen: list[int] = []
    messages: list[str] = []
    result = generate_fid_batch(
        _config(tiny_checkpoint, tiny_vae_dir, out, 80),
        prepare_pipeline=_recorder(seen),
        progress=False,
        log=messages.append,
    )
    assert result.new_samples == 16
    assert sorted(set(seen)) == list(range(64, 80))  # the 64 were not sampled again
    assert any("reusing 64 samples of samples_64.npz" in m for m in messages), messages
    grown, fresh = _entries(out / "samples_80.npz"), _entries(fresh_80 / "samples_80.npz")
    assert grown.keys() == fresh.keys() == {"arr_0.npy", "arr_1.npy"}
    assert grown["arr_0.npy"] == fresh["arr_0.npy"]
    assert grown["arr_1.npy"] == fresh["arr_1.npy"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["num_samples"] == 80
    assert manifest["info"]["reused"] == {"npz": "samples_64.npz", "samples": 64}
    assert len(manifest["info"]["runs"]) == 2
    # the grown folder resumes and completes like any other
    again = generate_fid_batch(_config(tiny_checkpoint, tiny_vae_dir, out, 80), progress=False)
    assert again.new_samples == 0


def test_shrinking_a_finished_run_samples_nothing(
    finished_64, tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    shutil.copytree(finished_64, out)
    seen: list[int] = []
    result = generate_fid_batch(
        _config(tiny_checkpoint, tiny_vae_dir, out, 40),
        prepare_pipeline=_recorder(seen),
        progress=False,
    )
    assert seen == [] and result.new_samples == 0
    with np.load(out / "samples_40.npz") as small, np.load(out / "samples_64.npz") as big:
        np.testing.assert_array_equal(small["arr_0"], big["arr_0"][:40])
        np.testing.assert_array_equal(small["arr_1"], big["arr_1"][:40])


def test_growing_is_refused_for_a_damaged_npz_or_class_balanced_labels(
    finished_64, tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    shutil.copytree(finished_64, out)
    _flip_a_pixel_byte(out / "samples_64.npz")
    with pytest.raises(ConfigurationError, match="sha256 differs"):
        generate_fid_batch(_config(tiny_checkpoint, tiny_vae_dir, out, 80), progress=False)

    balanced = tmp_path / "balanced"
    manifest = json.loads((finished_64 / "manifest.json").read_text())
    manifest["settings"]["class_balanced"] = True
    balanced.mkdir()
    (balanced / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(finished_64 / "samples_64.npz", balanced)
    config = _config(tiny_checkpoint, tiny_vae_dir, balanced, 2000, class_balanced=True)
    with pytest.raises(ConfigurationError, match="depend on the number of samples"):
        generate_fid_batch(config, progress=False)


def _flip_a_pixel_byte(path: Path) -> None:
    """Flip one bit in the middle of arr_0's data (size and header stay valid)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arr_0.npy")
    data = bytearray(path.read_bytes())
    # the local header: 30 bytes + name + extra; then the .npy header (128 bytes); then pixels
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + 128
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_manifest_records_the_npz_sha256_and_a_bit_flip_is_not_complete(
    finished_64, tmp_path, tiny_checkpoint, tiny_vae_dir
):
    out = tmp_path / "samples"
    shutil.copytree(finished_64, out)
    npz = out / "samples_64.npz"
    record = json.loads((out / "manifest.json").read_text())["complete"]
    assert record["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    _flip_a_pixel_byte(npz)
    messages: list[str] = []
    result = generate_fid_batch(
        _config(tiny_checkpoint, tiny_vae_dir, out, 64), progress=False, log=messages.append
    )
    assert result.new_samples == 64  # the shards were gone: everything is sampled again
    assert any("missing or damaged" in m for m in messages), messages
    assert _entries(npz) == _entries(finished_64 / "samples_64.npz")
