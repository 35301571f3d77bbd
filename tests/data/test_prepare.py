"""`selfflow prepare` in one process: what is stored, the order, resume, refusals, bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow import cli
from selfflow.base.classes import imagenet_wnids
from selfflow.base.errors import ConfigurationError, DatasetError
from selfflow.data import LatentDataset, adm_center_crop
from selfflow.data.prepare import PrepareConfig, prepare_dataset
from tests.data.trees import CLASSES, files_in, write_tree


def prepare(image_dir, out_dir, vae, **options):
    settings = dict(image_size=16, batch_size=3, shard_size=5, num_workers=0)
    settings.update(options)
    return prepare_dataset(
        PrepareConfig(image_dir, out_dir, vae=vae, **settings), progress=False, log=lambda m: None
    )


def cli_prepare(image_dir, out_dir, vae, *extra) -> int:
    args = ["prepare", str(image_dir), str(out_dir), "--vae", str(vae), "--image-size", "16"]
    return cli.main([*args, "--shard-size", "5", "--batch-size", "3", "--num-workers", "0", *extra])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "train")


@pytest.fixture(scope="module")
def prepared(tree, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "latents"
    result = prepare(tree, out, tiny_vae_dir, num_workers=2)
    assert result.num_images == 24 and result.new_images == 24
    return out


def expected_order(tree: Path) -> list[tuple[Path, int]]:
    """Sorted class folders, then sorted file names: written out independently of the code."""
    return [
        (path, label)
        for label, name in enumerate(sorted(CLASSES))
        for path in sorted((tree / name).iterdir(), key=lambda p: p.name)
    ]


def test_stored_posterior_is_the_encoders_for_each_cropped_image(prepared, tree, tiny_vae_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    ds = LatentDataset(prepared)
    order = expected_order(tree)
    assert len(ds) == len(order) == 24
    assert ds.class_names == sorted(CLASSES) and ds.num_classes == 3
    assert ds.latent_shape == (4, 8, 8) and ds.has_std and ds.scale == pytest.approx(0.18215)
    assert ds.vae == tiny_vae_dir
    for i, (path, label) in enumerate(order):
        with Image.open(path) as image:
            pixels = adm_center_crop(image, 16)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].double() / 127.5 - 1
        with torch.no_grad():
            posterior = vae.encode(x.float()).latent_dist
        mean, std, got_label = ds[i]
        assert got_label == label, path
        torch.testing.assert_close(mean, posterior.mean[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(std, posterior.std[0], rtol=0, atol=1e-6)
        assert float(std.min()) > 0


def test_manifest_records_the_settings_and_the_source(prepared, tree):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_images"] == 24
    assert manifest["image_size"] == 16 and manifest["crop"] == "adm_center_crop"
    assert manifest["vae_identity"].startswith("encoder-sha256:")
    assert manifest["num_files"] == 24 and len(manifest["files_digest"]) == 64
    assert manifest["source"]["root"] == str(tree.resolve())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 4]
    assert manifest["dtype"] == "float32" and manifest["package_version"]
    small = sum(min(Image.open(p).size) < 16 for p, _ in expected_order(tree))
    assert small > 0 and manifest["upscaled"] == small
    assert not list(prepared.rglob(".*"))  # no lock or temporary left behind


def test_workers_and_main_process_decoding_give_the_same_files(
    prepared, tree, tiny_vae_dir, tmp_path
):
    prepare(tree, tmp_path / "out", tiny_vae_dir, num_workers=0)
    assert files_in(tmp_path / "out") == files_in(prepared)


def test_rerunning_a_finished_folder_does_nothing(prepared, tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = prepare(tree, out, tiny_vae_dir)
    assert result.new_images == 0 and result.num_images == 24
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_damaged_and_missing_shards_are_redone(prepared, tree, tiny_vae_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False  # as a killed run leaves it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "labels.npy").unlink()
    damaged = out / "shards" / "shard_00001.npy"
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "shards" / "shard_00003.npy").unlink()
    (out / "shards" / ".shard_00004.npy.tmp-999").write_bytes(b"half")
    result = prepare(tree, out, tiny_vae_dir)
    assert result.new_images == 10  # shards 1 and 3 only
    assert files_in(out) == files_in(prepared)


@pytest.mark.parametrize(
    "change,named",
    [
        ({"image_size": 32}, "image_size: 16 in the folder, 32 now"),
        ({"limit": 6}, "source file list: 24 files"),
        ({"dtype": "float16"}, "dtype: 'float32' in the folder, 'float16' now"),
        ({"shard_size": 4}, "shard_size: 5 in the folder, 4 now"),
    ],
)
def test_a_folder_of_another_dataset_is_refused_naming_the_difference(
    prepared, tree, tiny_vae_dir, tmp_path, change, named
):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    with pytest.raises(DatasetError, match="holds another dataset") as caught:
        prepare(tree, out, tiny_vae_dir, **change)
    assert named in str(caught.value) and "--overwrite" in str(caught.value)
    assert files_in(out) == files_in(prepared)  # nothing touched


def test_another_vae_is_refused_and_overwrite_starts_over(prepared, tree, tmp_path, capsys):
    from tests.conftest import make_tiny_vae

    other = make_tiny_vae()
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other_vae")
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    assert cli_prepare(tree, out, tmp_path / "other_vae") == 1
    assert "VAE encoder:" in capsys.readouterr().err
    assert cli_prepare(tree, out, tmp_path / "other_vae", "--overwrite") == 0
    assert "24 images" in capsys.readouterr().out
    changed = LatentDataset(out)
    assert changed.identity != LatentDataset(prepared).identity
    assert not torch.equal(changed[0][0], LatentDataset(prepared)[0][0])


@pytest.mark.parametrize(
    ("settings", "recorded"),
    [
        ({"scaling_factor": 0.13025}, {"scaling_factor": 0.13025, "shift_factor": 0.0}),
        ({"shift_factor": 0.06}, {"scaling_factor": 0.18215, "shift_factor": 0.06}),
    ],
)
def test_a_vae_with_another_latent_scale_or_a_shift_is_recorded_in_the_manifest(
    tree, tmp_path, settings, recorded
):
    # (it was refused before latent conventions were recorded; the model now decodes with it)
    from tests.conftest import make_tiny_vae

    other = make_tiny_vae()
    other.register_to_config(**settings)
    other.save_pretrained(tmp_path / "other_vae")
    assert cli_prepare(tree, tmp_path / "out", tmp_path / "other_vae") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # the tiny VAE: 4 latent channels, one downsampling (16 pixels -> 8 latents)
    assert manifest["latent"] == {"channels": 4, "factor": 2, "mean": None, "std": None, **recorded}
    assert manifest["scale"] == recorded["scaling_factor"] and manifest["latent_norm"] == "none"


def test_encoding_runs_with_tf32_off_and_restores_the_caller_setting(
    tree, tiny_vae_dir, tmp_path, monkeypatch
):
    # TF32 matmuls/convolutions would make the stored posteriors depend on the GPU generation
    import selfflow.model.vae

    matmul = torch.backends.cuda.matmul
    name, tf32, ieee = (
        ("fp32_precision", "tf32", "ieee")
        if hasattr(matmul, "fp32_precision")
        else ("allow_tf32", True, False)
    )
    real, seen = selfflow.model.vae.encode_posterior, []

    def recording(*args, **kwargs):
        seen.append(getattr(matmul, name))
        return real(*args, **kwargs)

    monkeypatch.setattr(selfflow.model.vae, "encode_posterior", recording)
    saved = getattr(matmul, name)
    setattr(matmul, name, tf32)
    try:
        prepare(tree, tmp_path / "out", tiny_vae_dir, limit=2)
        assert getattr(matmul, name) == tf32
    finally:
        setattr(matmul, name, saved)
    assert len(seen) > 1 and set(seen) == {ieee}


def test_decoder_only_differences_keep_the_identity(prepared, tree, tiny_vae_dir, tmp_path):
    """sd-vae-ft-ema and -ft-mse share the encoder: a VAE whose decoder differs resumes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.5)
    vae.save_pretrained(tmp_path / "decoder_changed")
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    assert prepare(tree, out, tmp_path / "decoder_changed").new_images == 0


def test_limit_and_classes_take_the_first_of_each(tree, tiny_vae_dir, tmp_path):
    prepare(tree, tmp_path / "out", tiny_vae_dir, limit=3, classes=2)
    ds = LatentDataset(tmp_path / "out")
    assert ds.class_names == sorted(CLASSES)[:2]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    full = LatentDataset(prepare(tree, tmp_path / "full", tiny_vae_dir).out_dir)
    for i, j in enumerate([0, 1, 2, 8, 9, 10]):  # other batches: float reordering only
        torch.testing.assert_close(ds[i][0], full[j][0], rtol=0, atol=1e-6)


def test_float16_storage_is_the_float32_values_rounded(prepared, tree, tiny_vae_dir, tmp_path):
    prepare(tree, tmp_path / "half", tiny_vae_dir, dtype="float16")
    half, full = LatentDataset(tmp_path / "half"), LatentDataset(prepared)
    means, stds, _ = half.get_batch(np.arange(24))
    ref_means, ref_stds, _ = full.get_batch(np.arange(24))
    assert means.dtype == torch.float32
    assert torch.equal(means, ref_means.half().float()) and torch.equal(
        stds, ref_stds.half().float()
    )
    assert (tmp_path / "half" / "shards" / "shard_00000.npy").stat().st_size < (
        prepared / "shards" / "shard_00000.npy"
    ).stat().st_size


def test_a_second_run_in_the_same_folder_is_refused(tree, tiny_vae_dir, tmp_path):
    from selfflow.base.lock import FolderBusyError, FolderLock

    (tmp_path / "out").mkdir()
    holder = FolderLock(tmp_path / "out", "selfflow prepare", "OUT_DIR")  # a running prepare
    with holder, pytest.raises(FolderBusyError) as caught:
        prepare(tree, tmp_path / "out", tiny_vae_dir)
    assert "is in use by `selfflow prepare` (pid" in str(caught.value)
    assert str(caught.value).endswith("or choose another OUT_DIR")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_folder_holding_other_things_is_refused_before_any_work(
    tree, tiny_vae_dir, tmp_path, monkeypatch
):
    """A run folder as OUT_DIR: prepare wrote its dataset among the run's files."""
    import selfflow.model.vae
    from tests.train.helpers import folder_snapshot

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded before OUT_DIR was checked")

    monkeypatch.setattr(selfflow.model.vae, "load_vae", no_vae)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "run.json").write_text("{}")
    (run / "log.jsonl").write_text("")
    before = folder_snapshot(run)
    with pytest.raises(DatasetError) as caught:
        prepare(tree, run, tiny_vae_dir)
    assert (
        f"OUT_DIR {run} is not empty and holds no selfflow dataset: checkpoints/, log.jsonl, "
        f"run.json, tensorboard/;" in str(caught.value)
    )
    assert folder_snapshot(run) == before  # nothing written, not even the lock

    batch = tmp_path / "batch"  # a `selfflow sample` folder has a manifest.json of its own
    batch.mkdir()
    (batch / "manifest.json").write_text(json.dumps({"format": "selfflow-fid-batch"}))
    with pytest.raises(DatasetError, match="is not a selfflow dataset manifest"):
        prepare(tree, batch, tiny_vae_dir)


def test_a_mistyped_vae_folder_is_named_and_leaves_no_out_dir(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["prepare", str(tree), str(out), "--vae", "tinyvea", "--no-progress"]) == 1
    assert "there is no VAE folder tinyvea" in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_folder_and_one_with_hidden_files_are_accepted(tree, tiny_vae_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"")
    for out in (tmp_path / "empty", tmp_path / "hidden"):
        assert prepare(tree, out, tiny_vae_dir, limit=1).num_images == 3


def test_an_unfinished_folder_is_not_read_as_a_dataset(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="unfinished"):
        LatentDataset(out)


# -- ImageNet folders -----------------------------------------------------------------------------


def test_imagenet_wnid_folders_are_checked_against_the_1000(tiny_vae_dir, tmp_path):
    wnids = imagenet_wnids()
    good = write_tree(tmp_path / "good", per_class=2, classes=wnids[:2])
    result = prepare(good, tmp_path / "out", tiny_vae_dir, classes=2)
    assert LatentDataset(result.out_dir).class_names == list(wnids[:2])
    with pytest.raises(DatasetError, match=rf"998 of the 1000 .*missing: {wnids[2]}, {wnids[3]}"):
        prepare(good, tmp_path / "out2", tiny_vae_dir)
    gap = write_tree(tmp_path / "gap", per_class=1, classes=(wnids[0], wnids[2]))
    with pytest.raises(DatasetError, match=rf"1 of the first 2 .*missing: {wnids[1]}"):
        prepare(gap, tmp_path / "out3", tiny_vae_dir, classes=2)
    extra = write_tree(tmp_path / "extra", per_class=1, classes=(wnids[0], "n99999999"))
    with pytest.raises(DatasetError, match="not among ImageNet's 1000 classes: n99999999"):
        prepare(extra, tmp_path / "out4", tiny_vae_dir, classes=1)


# -- bad input ------------------------------------------------------------------------------------


def small_tree(root: Path) -> Path:
    return write_tree(root, per_class=3, seed=5)


def test_a_truncated_image_stops_the_run_naming_it(tiny_vae_dir, tmp_path, capsys):
    tree = small_tree(tmp_path / "tree")
    victim = tree / "bee" / "img_001b.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(victim, quality=95)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir) == 1
    err = capsys.readouterr().err
    assert str(victim) in err and "--skip-bad-images" in err
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir, "--skip-bad-images") == 0
    out = capsys.readouterr().out
    assert f"skipped 1 bad file: bee/{victim.name} (listed under 'skipped'" in out
    upscaled = json.loads((tmp_path / "out" / "manifest.json").read_text())["upscaled"]
    noun = "1 image was" if upscaled == 1 else f"{upscaled} images were"
    assert upscaled > 0 and f"{noun} smaller than the crop" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [entry["file"] for entry in manifest["skipped"]] == [f"bee/{victim.name}"]
    ds = LatentDataset(tmp_path / "out")
    assert len(ds) == 9 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_the_summary_counts_the_images_encoded_and_times_the_encoding_alone(
    tiny_vae_dir, tmp_path, monkeypatch
):
    """It said "10 encoded now in 2.7 s, 3.7 images/s" for 9 images and a skipped file, timed
    from the start (the VAE's loading included), and "skipped 1 bad files"."""
    import selfflow.model.vae

    tree = small_tree(tmp_path / "tree")
    (tree / "bee" / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    real = selfflow.model.vae.load_vae

    def slow_load(*args, **kwargs):
        time.sleep(1.5)  # a start-up that the encoding rate must leave out
        return real(*args, **kwargs)

    monkeypatch.setattr(selfflow.model.vae, "load_vae", slow_load)
    began = time.perf_counter()
    result = prepare(tree, tmp_path / "out", tiny_vae_dir, skip_bad_images=True)
    elapsed = time.perf_counter() - began
    assert result.new_images == 9  # the 9 images of small_tree; the broken file is not one
    assert result.startup_seconds >= 1.5
    assert result.seconds + result.startup_seconds <= elapsed
    summary = result.summary()
    assert (
        f"9 images encoded now in {result.seconds:.1f} s ({9 / result.seconds:.1f} images/s; "
        f"start-up {result.startup_seconds:.1f} s)" in summary
    )
    assert "skipped 1 bad file: bee/broken.jpg (listed under 'skipped'" in summary


def test_an_undecodable_file_is_named_and_can_be_skipped(tiny_vae_dir, tmp_path, capsys):
    tree = small_tree(tmp_path / "tree")
    (tree / "cow" / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir) == 1
    assert str(tree / "cow" / "broken.jpg") in capsys.readouterr().err
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir, "--skip-bad-images") == 0
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    assert [entry["file"] for entry in skipped] == ["cow/broken.jpg"]
    assert "UnidentifiedImageError" in skipped[0]["reason"]


def test_a_non_image_file_is_named_before_any_work(tiny_vae_dir, tmp_path, capsys):
    tree = small_tree(tmp_path / "tree")
    (tree / "ant" / "notes.txt").write_text("hello")
    (tree / "ant" / ".DS_Store").write_text("ignored: hidden")
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir) == 1
    err = capsys.readouterr().err
    assert "ant/notes.txt" in err and "not images" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert cli_prepare(tree, tmp_path / "out", tiny_vae_dir, "--skip-bad-images") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [entry["file"] for entry in manifest["skipped"]] == ["ant/notes.txt"]
    assert manifest["num_images"] == 9


def test_empty_folders_are_refused(tiny_vae_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        prepare(tmp_path / "empty", tmp_path / "out", tiny_vae_dir)
    tree = small_tree(tmp_path / "tree")
    (tree / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*dog holds no images"):
        prepare(tree, tmp_path / "out", tiny_vae_dir)
    with pytest.raises(ConfigurationError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out", tiny_vae_dir)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"image_size": 0}, "--image-size"),
        ({"image_size": 2}, "gives 1×1 latents"),  # the tiny VAE downsamples by 2
        ({"image_size": 6}, "gives 3×3 latents.*multiple of 4"),
        ({"image_size": 7}, "not a multiple of the VAE's downsampling factor 2"),
        ({"batch_size": 0}, "--batch-size"),
        ({"num_workers": -1}, "--num-workers"),
        ({"dtype": "bfloat16"}, "--dtype"),
        ({"classes": 9}, "--classes 9"),
    ],
)
def test_bad_options_are_refused_before_work(tiny_vae_dir, tmp_path, options, message):
    tree = small_tree(tmp_path / "tree")
    with pytest.raises((ConfigurationError, DatasetError), match=message):
        prepare(tree, tmp_path / "out", tiny_vae_dir, **options)
    assert not (tmp_path / "out").exists()


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "prepare" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    text = capsys.readouterr().out
    for option in ("--image-size", "--vae", "--dtype", "--batch-size", "--num-workers", "--limit"):
        assert option in text
    assert "--classes" in text and "--skip-bad-images" in text and "torchrun" in text
