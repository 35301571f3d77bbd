"""A user's own folder end to end (issue #23, items 1, 2, 3, 12 and 19): prepare with a relative
--vae, train from another folder, export, sample and generate from the export alone. The model
carries its classes and its VAE (selfflow.model.card); labels come from its own label space."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from selfflow.base.classes import class_index, imagenet_classes
from selfflow.base.errors import CheckpointError
from selfflow.model.card import RELEASED, ModelCard
from selfflow.model.checkpoint import checkpoint_classes, load_model, read_card, save_model
from selfflow.model.network import ModelConfig, SelfFlowDiT
from tests.conftest import make_tiny_vae, randomize_
from tests.data.trees import write_tree

CLASSES = ("boat", "car", "tree")
TRAIN = ["--model", "tiny", "--steps", "2", "--global-batch-size", "4", "--checkpoint-every",
         "2", "--log-every", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
FAST = ["--num-steps", "2", "--mode", "ODE", "--device", "cpu"]


def _other_vae(folder: Path) -> Path:
    """A VAE of the same shape whose encoder has other weights."""
    vae = make_tiny_vae()
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.add_(0.01)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_vae_dir):
    """prepare (relative --vae) in one folder, train from another, export: the user's path."""
    root = tmp_path_factory.mktemp("own")
    work, other = root / "work", root / "other"
    write_tree(work / "images", per_class=4, classes=CLASSES)
    shutil.copytree(tiny_vae_dir, work / "tinyvae")
    other.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert (
            cli.main(["prepare", "images", "data", "--vae", "tinyvae", "--image-size", "16"]) == 0
        )
        mp.chdir(other)
        assert cli.main(["train", "--data", "../work/data", "--output-dir", "run", "--sample-every", "2", *TRAIN]) == 0  # fmt: skip
    return root


def test_prepare_records_the_vae_where_any_folder_finds_it(own_run):
    manifest = json.loads((own_run / "work" / "data" / "manifest.json").read_text())
    assert manifest["vae"] == str((own_run / "work" / "tinyvae").resolve())
    # the grid of the run trained from another folder was decoded by that VAE
    assert list((own_run / "other" / "run" / "samples").glob("*.png"))


def test_export_carries_classes_and_vae_and_says_its_step(own_run, capsys, monkeypatch):
    monkeypatch.chdir(own_run / "other")
    assert cli.main(["export", "run", "own.pt"]) == 0
    said = capsys.readouterr().out
    assert "step 2" in said and "3 classes (boat, car, tree)" in said, said
    card, config = read_card("own.pt")
    manifest = json.loads((own_run / "work" / "data" / "manifest.json").read_text())
    assert card.class_names == CLASSES and config.num_classes == 3
    assert card.vae == manifest["vae"] and card.vae_identity == manifest["vae_identity"]
    # the trainer's own export of that step carries the same card
    assert read_card(Path("run") / "checkpoints" / "step_000000002-ema.pt")[0] == card
    # a wrong suffix is refused before anything is read
    assert cli.main(["export", "run", "out.txt"]) == 1
    assert "expected a file ending in .pt or .safetensors" in capsys.readouterr().err
    assert not Path("out.txt").exists()


def test_rerunning_a_finished_run_names_its_export(own_run, capsys, monkeypatch):
    monkeypatch.chdir(own_run / "other")
    assert cli.main(["train", "--data", "../work/data", "--output-dir", "run", "--sample-every", "2", *TRAIN]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "EMA export None" not in out and "step_000000002-ema.pt" in out, out


def test_classes_lists_the_models_own(own_run, capsys, monkeypatch):
    monkeypatch.chdir(own_run / "other")
    assert cli.main(["classes", "--ckpt", "run/checkpoints/step_000000002-ema.pt"]) == 0
    assert capsys.readouterr().out.splitlines() == ["0\t-\tboat", "1\t-\tcar", "2\t-\ttree"]
    assert cli.main(["classes", "--ckpt", "run/checkpoints/step_000000002-ema.pt", "plane"]) == 1
    assert "no class of" in capsys.readouterr().err


def test_sample_draws_labels_from_the_models_classes_with_its_own_vae(own_run, monkeypatch):
    monkeypatch.chdir(own_run / "other")
    export = "run/checkpoints/step_000000002-ema.pt"
    args = ["sample", "--ckpt", export, "--num-fid-samples", "12", "--batch-size", "4", *FAST]
    assert cli.main([*args, "--output-dir", "uniform"]) == 0  # no --vae: the export's own
    labels = np.load("uniform/samples_12.npz")["arr_1"]
    assert labels.min() >= 0 and labels.max() <= 2 and len(set(labels.tolist())) > 1
    manifest = json.loads(Path("uniform/manifest.json").read_text())
    assert manifest["settings"]["num_classes"] == 3
    assert manifest["info"]["vae"] == str((own_run / "work" / "tinyvae").resolve())
    assert cli.main([*args, "--output-dir", "balanced", "--class-balanced"]) == 0
    balanced = np.load("balanced/samples_12.npz")["arr_1"]
    assert np.bincount(balanced, minlength=3).tolist() == [4, 4, 4]
    assert cli.main([*args, "--output-dir", "bad", "--class-balanced", "--num-fid-samples", "10"]) == 1  # fmt: skip


def test_generate_names_the_models_classes(own_run, monkeypatch, capsys):
    import selfflow.base.images

    monkeypatch.chdir(own_run / "other")
    seen = {}
    real = selfflow.base.images.save_grid

    def recording(images, path, columns=None, captions=None):
        seen["captions"] = captions
        return real(images, path, columns, captions=captions)

    monkeypatch.setattr(selfflow.base.images, "save_grid", recording)
    export = "run/checkpoints/step_000000002-ema.pt"
    base = ["generate", "--ckpt", export, "--num", "3", "--captions", *FAST, "--out", "g.png"]
    assert cli.main([*base, "--class", "boat", "tree", "unconditional"]) == 0
    assert seen["captions"] == ["0 boat", "2 tree", "unconditional"]
    assert cli.main([*base, "--class", "tench"]) == 1  # an ImageNet name is not this model's
    err = capsys.readouterr().err
    assert "no class of this model matches 'tench'" in err and "boat" in err


def test_a_vae_with_another_encoder_is_refused_unless_insisted_on(own_run, monkeypatch, capsys):
    monkeypatch.chdir(own_run / "other")
    other = _other_vae(own_run / "other" / "othervae")
    export = "run/checkpoints/step_000000002-ema.pt"
    base = ["generate", "--ckpt", export, "--num", "1", *FAST, "--vae", str(other)]
    assert cli.main([*base, "--out", "x.png"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder" in err[0] and "--allow-vae-mismatch" in err[0], err
    assert not Path("x.png").exists()
    with pytest.warns(UserWarning, match="decoding with it anyway"):
        assert cli.main([*base, "--out", "y.png", "--allow-vae-mismatch"]) == 0
    # the same VAE under another path is the same encoder: accepted without a word
    copy = shutil.copytree(own_run / "work" / "tinyvae", own_run / "other" / "copy")
    assert cli.main(["generate", "--ckpt", export, "--num", "1", *FAST, "--vae", str(copy), "--out", "z.png"]) == 0  # fmt: skip


def test_train_vae_is_checked_against_the_data_and_a_missing_one_is_named(
    own_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(own_run / "other")
    data = own_run / "work" / "data"
    other = _other_vae(tmp_path / "othervae")
    run = ["train", "--data", str(data), "--sample-every", "2", *TRAIN]
    assert cli.main([*run, "--output-dir", str(tmp_path / "a"), "--vae", str(other)]) == 1
    err = capsys.readouterr().err
    assert "encoder" in err and "--allow-vae-mismatch" in err
    assert not (tmp_path / "a" / "run.json").exists()
    # the recorded folder moved away: named, with what to do; --vae with it works
    shutil.copytree(own_run / "work" / "tinyvae", tmp_path / "vae")
    images, moved = str(own_run / "work" / "images"), str(tmp_path / "data")
    assert cli.main(["prepare", images, moved, "--vae", str(tmp_path / "vae"), "--image-size", "16"]) == 0  # fmt: skip
    (tmp_path / "vae").rename(tmp_path / "vaecopy")
    run = ["train", "--data", moved, "--sample-every", "2", *TRAIN]
    assert cli.main([*run, "--output-dir", str(tmp_path / "b"), "--dry-run"]) == 1
    assert "not on this machine" in capsys.readouterr().err
    vae = ["--vae", str(tmp_path / "vaecopy")]
    assert cli.main([*run, "--output-dir", str(tmp_path / "b"), *vae, "--dry-run"]) == 0
    assert f"VAE: the local folder {tmp_path / 'vaecopy'}" in capsys.readouterr().out
    assert cli.main([*run, "--output-dir", str(tmp_path / "b"), *vae]) == 0
    card = read_card(tmp_path / "b" / "checkpoints" / "step_000000002-ema.pt")[0]
    assert card.vae == str(tmp_path / "vaecopy") and card.class_names == CLASSES


def test_files_without_a_card_are_the_released_model(tmp_path, tiny_model):
    path = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), path)  # a bare state dict, as the released file
    assert read_card(path) == (RELEASED, None)
    assert checkpoint_classes(None) == imagenet_classes()
    assert RELEASED.vae == "stabilityai/sd-vae-ft-ema" and RELEASED.class_names is None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_card_survives_both_formats_and_a_damaged_one_is_refused(tmp_path, suffix):
    model = randomize_(SelfFlowDiT(replace(ModelConfig.tiny(), num_classes=3)))
    card = ModelCard(("a", "b", "c"), "/some/vae", "encoder-sha256:" + "0" * 64, "ds")
    path = save_model(model, tmp_path / f"m{suffix}", card=card)
    assert load_model(path).checkpoint_info.card == card
    assert read_card(path)[0] == card
    # a re-save of a loaded model keeps its card
    assert read_card(save_model(load_model(path), tmp_path / f"again{suffix}"))[0] == card
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        raw["card"] = {"class_names": "abc"}
        torch.save(raw, tmp_path / "damaged.pt")
        with pytest.raises(CheckpointError, match="model card is damaged"):
            load_model(tmp_path / "damaged.pt")


def test_a_model_of_wnid_folders_reads_back_imagenet_names():
    card = ModelCard(class_names=("n01440764", "my-own"))
    classes = card.classes(2)
    assert [(c.wnid, c.name) for c in classes] == [("n01440764", "tench"), ("", "my-own")]
    # a label space widened past the data (train --num-classes) names the rest by number
    assert [c.name for c in card.classes(4)][2:] == ["class 2", "class 3"]


def test_generate_help_example_names_real_classes():
    """Item 19: the example in `generate --help` (and the README) must resolve."""
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    example = generate.description.split("Example: ", 1)[1]
    words = shlex.split(example)
    queries = words[words.index("--class") + 1 : words.index("--num")]
    assert [class_index(q) for q in queries] == [207, 281]  # golden retriever, tabby (cat)
