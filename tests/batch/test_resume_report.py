"""What a resumed `selfflow sample` says and records (issue 23, item 21): shards and images are
counted apart, and the manifest's ``vae_dtype`` is the dtype the VAE ran in."""

from __future__ import annotations

import json

import torch

from selfflow import cli

N, SHARD = 10, 4  # shards of 4, 4 and 2 images


def sample(checkpoint, vae, out, capsys) -> str:
    args = [
        "sample", "--ckpt", checkpoint, "--vae", vae, "--output-dir", str(out),
        "--num-fid-samples", str(N), "--batch-size", "4", "--num-steps", "2",
        "--shard-size", str(SHARD), "--keep-shards",
    ]  # fmt: skip
    assert cli.main(args) == 0
    return capsys.readouterr().out


def test_a_resume_says_shards_and_images_apart(tmp_path, tiny_checkpoint, tiny_vae_dir, capsys):
    out = tmp_path / "samples"
    first = sample(tiny_checkpoint, tiny_vae_dir, out, capsys)
    assert f"{N} images in 3 shards of {SHARD}: 3 shards ({N} images) to sample" in first
    # undo the end of the run: its npz and the middle shard (4 images) are gone
    (out / f"samples_{N}.npz").unlink()
    (out / "shards" / "shard_00001.npz").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = sample(tiny_checkpoint, tiny_vae_dir, out, capsys)
    # done: shard 0 (4 images) and the short shard 2 (2 images)
    assert f"3 shards of {SHARD}: 2 shards (6 images) done, 1 shard (4 images) to sample" in again


def test_the_manifest_records_the_dtype_the_vae_ran_in(
    tmp_path, tiny_checkpoint, tiny_vae_dir, capsys, monkeypatch
):
    import selfflow.model.vae

    loaded = []
    load_vae = selfflow.model.vae.load_vae

    def remember(*args, **kwargs):
        vae = load_vae(*args, **kwargs)
        loaded.append(next(vae.parameters()).dtype)
        return vae

    monkeypatch.setattr(selfflow.model.vae, "load_vae", remember)
    said = sample(tiny_checkpoint, tiny_vae_dir, tmp_path / "default", capsys)
    settings = json.loads((tmp_path / "default" / "manifest.json").read_text())["settings"]
    assert settings["dtype"] == "float32"  # the network, on the CPU
    assert settings["vae_dtype"] == str(loaded[-1]).removeprefix("torch.")
    assert f"VAE in {settings['vae_dtype']}" in said

    def in_float32(*args, **kwargs):  # a VAE that runs in float32 must be recorded as such
        return remember(*args, **{**kwargs, "dtype": torch.float32})

    monkeypatch.setattr(selfflow.model.vae, "load_vae", in_float32)
    said = sample(tiny_checkpoint, tiny_vae_dir, tmp_path / "float32", capsys)
    settings = json.loads((tmp_path / "float32" / "manifest.json").read_text())["settings"]
    assert loaded[-1] == torch.float32
    assert settings["vae_dtype"] == "float32" and "VAE in float32" in said
