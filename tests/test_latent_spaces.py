"""Past 256 × 256 and past SD-VAE (issue 21): any resolution and any diffusers AutoencoderKL,
from ``prepare`` to ``evaluate``, each model decoding with the latent convention it was
trained on (selfflow.model.latents).

Three latent worlds, built from tiny random VAEs saved in diffusers' format: a 4-channel VAE
(downsampling 4) at 64 and at 128 pixels, and a 16-channel VAE with a scaling and a shift
factor (downsampling 2) whose dataset also carries per-channel statistics. The references are
diffusers' own calls (``vae.encode``/``vae.decode``) with the arithmetic its pipelines use,
and float64 re-computations written here from the definitions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from selfflow.base.errors import ConfigurationError
from selfflow.data import LatentDataset
from selfflow.model.card import ModelCard
from selfflow.model.checkpoint import read_card
from selfflow.model.latents import SD_VAE, LatentConvention, convention_of_vae
from selfflow.model.network import SelfFlowDiT
from tests.conftest import make_tiny_vae
from tests.data.trees import write_tree

TRAIN = ["--model", "tiny", "--steps", "2", "--global-batch-size", "4", "--checkpoint-every",
         "2", "--log-every", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
FAST = ["--num-steps", "2", "--mode", "ODE", "--device", "cpu"]
SHIFTED = {"scaling_factor": 1.5, "shift_factor": 0.25}  # SD3/FLUX-style: (z - shift) · scale


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    made = {
        "four": make_tiny_vae(blocks=(8, 8, 16)),  # 4 channels, factor 4, SD's 0.18215
        "sixteen": make_tiny_vae(latent_channels=16, **SHIFTED),  # 16 channels, factor 2
    }
    for name, vae in made.items():
        vae.save_pretrained(root / name)
    return {name: root / name for name in made}


# -- the convention itself ----------------------------------------------------------------------


def test_the_convention_is_diffusers_arithmetic_and_its_inverse():
    # diffusers' pipelines: latents = (z - shift) * scale to train; z = latents / scale + shift
    # before vae.decode (SD3's and FLUX's pipelines); per-channel statistics on top
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    plain = LatentConvention(channels=2, scaling_factor=1.5, shift_factor=0.25)
    assert torch.equal(plain.normalise(z), (z - 0.25) * 1.5)
    assert torch.equal(plain.denormalise(plain.normalise(z) * 1), ((z - 0.25) * 1.5) / 1.5 + 0.25)
    stats = plain.with_statistics([0.5, -1.0], [2.0, 0.25])
    by_hand = ((z - 0.25) * 1.5 - torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)) / torch.tensor(
        [2.0, 0.25]
    ).view(1, 2, 1, 1)
    assert torch.allclose(stats.normalise(z), by_hand, rtol=0, atol=1e-12)
    assert torch.allclose(stats.denormalise(stats.normalise(z)), z, rtol=0, atol=1e-12)
    # SD-VAE's, the released model's: exactly the released sampler's z / 0.18215
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(SD_VAE.denormalise(x), x / 0.18215)
    assert torch.equal(SD_VAE.normalise(x), x * 0.18215)
    assert LatentConvention.from_dict(stats.to_dict()) == stats


def test_old_cards_mean_sd_vae_and_a_damaged_convention_is_named():
    assert ModelCard.from_dict({"class_names": None, "vae": None}).convention == SD_VAE
    with pytest.raises(ValueError, match="per-channel statistics need 4"):
        LatentConvention.from_dict({"channels": 4, "mean": [0.0], "std": [1.0]})
    with pytest.raises(ValueError, match="unknown entries"):
        LatentConvention.from_dict({"channels": 4, "offset": 1})


def test_a_vae_of_another_convention_is_refused_naming_both(vaes):
    from selfflow.model.vae import load_vae

    sixteen = load_vae(vaes["sixteen"], dtype=torch.float32)
    found = convention_of_vae(sixteen)
    assert (found.channels, found.factor) == (16, 2)
    assert (found.scaling_factor, found.shift_factor) == (1.5, 0.25)
    with pytest.raises(ConfigurationError) as caught:
        SD_VAE.check_vae(sixteen, "sixteen")
    said = str(caught.value)
    assert "16 channels" in said and "(z − 0.25) · 1.5" in said and "4 channels" in said
    # another shift alone is refused too
    with pytest.raises(ConfigurationError, match="0.25"):
        LatentConvention(channels=16, scaling_factor=1.5, shift_factor=0.0).check_vae(sixteen, "x")


def test_a_vae_config_with_latents_mean_and_std_is_taken_as_diffusers_pipelines_take_it(
    tmp_path,
):
    """Playground v2.5's VAE config carries ``latents_mean``/``latents_std``; the SDXL
    pipeline decodes ``latents · std / scaling_factor + mean`` (so it trained on
    ``(z − mean) · scaling_factor / std``). Written out here in float64, with and without a
    shift factor (which diffusers never combines with them: the raw-z form must hold anyway)."""
    from selfflow.model.vae import load_vae

    raw_mean, raw_std = [0.5, -0.25, 0.0, 1.0], [2.0, 4.0, 0.5, 1.0]
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    column = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 4, 1, 1)  # noqa: E731
    for shift in (None, 0.25):
        folder = tmp_path / f"shift{shift}"
        make_tiny_vae(
            scaling_factor=0.5, shift_factor=shift, latents_mean=raw_mean, latents_std=raw_std
        ).save_pretrained(folder)
        convention = convention_of_vae(load_vae(folder, dtype=torch.float32))
        expected = (z - column(raw_mean)) * 0.5 / column(raw_std)
        torch.testing.assert_close(convention.normalise(z), expected, rtol=1e-12, atol=1e-12)
        pipeline_z = expected * column(raw_std) / 0.5 + column(raw_mean)  # SDXL's decode
        torch.testing.assert_close(convention.denormalise(expected), pipeline_z)
        assert "per-channel mean/std" in convention.describe()

    broken = tmp_path / "broken"
    make_tiny_vae(latents_mean=[0.0] * 3, latents_std=[1.0] * 3).save_pretrained(broken)
    with pytest.raises(ConfigurationError, match=r"does not define a latent space.*need 4"):
        convention_of_vae(load_vae(broken, dtype=torch.float32))


# -- statistics and the round trip ----------------------------------------------------------------


@pytest.fixture(scope="module")
def normed(tmp_path_factory, vaes) -> Path:
    """The 16-channel VAE's dataset with per-channel statistics, in float16 and several shards
    encoded by two workers (statistics combined across shards)."""
    root = tmp_path_factory.mktemp("normed")
    write_tree(root / "images", per_class=3, classes=("a", "b", "c"))
    args = ["prepare", str(root / "images"), str(root / "data"), "--vae", str(vaes["sixteen"])]
    args += ["--image-size", "32", "--latent-norm", "channel", "--shard-size", "4"]
    assert cli.main([*args, "--dtype", "float16", "--num-workers", "2", "--no-progress"]) == 0
    return root / "data"


def test_stored_channel_statistics_match_a_float64_recomputation(normed):
    dataset = LatentDataset(normed)
    assert dataset.num_shards == 3 and dataset.dtype == "float16"
    means, stds, _ = dataset.get_batch(np.arange(len(dataset)))
    z = means.double()
    scaled = (z - 0.25) * 1.5  # the VAE's own convention, written out
    # what training sees is (mean + std·n) scaled: its variance per channel is the variance of
    # the scaled means plus the mean scaled posterior variance (total variance)
    mu = scaled.mean(dim=(0, 2, 3))
    var = ((scaled - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    var = var + ((stds.double() * 1.5) ** 2).mean(dim=(0, 2, 3))
    convention = dataset.latent
    assert convention.mean is not None and convention.std is not None
    assert np.allclose(convention.mean, mu.numpy(), rtol=1e-12, atol=1e-12)
    assert np.allclose(convention.std, var.sqrt().numpy(), rtol=1e-12, atol=1e-12)
    # a Monte-Carlo check of "what training sees": many posterior draws, normalised
    draws = torch.stack(
        [convention.normalise(z + stds.double() * torch.randn_like(z)) for _ in range(32)]
    )
    assert draws.mean(dim=(0, 1, 3, 4)).abs().max() < 0.05
    assert (draws.std(dim=(0, 1, 3, 4)) - 1).abs().max() < 0.05
    # the same folder prepared again by one process in other batches: the same statistics
    manifest = json.loads((normed / "manifest.json").read_text())
    assert manifest["latent"]["mean"] == list(convention.mean)


def test_prepare_records_the_vae_configs_statistics_unless_it_measures_its_own(tmp_path):
    from selfflow.model.vae import load_vae

    folder = tmp_path / "playground"
    make_tiny_vae(
        latents_mean=[0.5, -0.25, 0.0, 1.0], latents_std=[2.0, 4.0, 0.5, 1.0]
    ).save_pretrained(folder)
    declared = convention_of_vae(load_vae(folder, dtype=torch.float32))
    write_tree(tmp_path / "images", per_class=2, classes=("a", "b"))
    common = ["--vae", str(folder), "--image-size", "32", "--num-workers", "0", "--no-progress"]
    assert (
        cli.main(["prepare", str(tmp_path / "images"), str(tmp_path / "as-declared"), *common]) == 0
    )
    assert LatentDataset(tmp_path / "as-declared").latent == declared
    measured = tmp_path / "measured"
    assert (
        cli.main(
            [
                "prepare",
                str(tmp_path / "images"),
                str(measured),
                *common,
                "--latent-norm",
                "channel",
            ]
        )
        == 0
    )
    found = LatentDataset(measured).latent
    assert found.mean is not None and found.mean != declared.mean and found.std != declared.std
    assert found.same_vae_space(declared)


def test_encoding_then_decoding_through_the_stored_convention_is_the_vaes_round_trip(normed, vaes):
    from diffusers import AutoencoderKL

    from selfflow.model.vae import decode, encode_posterior

    convention = LatentDataset(normed).latent
    vae = AutoencoderKL.from_pretrained(vaes["sixteen"]).eval()
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mean, _ = encode_posterior(vae, images)
    model_latents = convention.normalise(mean)  # what the model learns to produce
    ours = decode(vae, model_latents, convention=convention)
    with torch.no_grad():  # diffusers by hand: encode, then decode(z / scale * scale + shift)
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(x).latent_dist.mean
        latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    reference = ((pixels + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.abs(ours.astype(int) - reference.numpy().astype(int)).max() <= 1
    # without the statistics (decoding as if the model's numbers were the VAE's) it is wrong
    wrong = decode(vae, model_latents, convention=LatentConvention(16, 2, **SHIFTED))
    assert np.abs(wrong.astype(int) - reference.numpy().astype(int)).max() > 8


# -- end to end ---------------------------------------------------------------------------------


def _reference_batch(path: Path, size: int, count: int = 10) -> Path:
    images = np.random.default_rng(size).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


def _end_to_end(root: Path, vae: Path, size: int, inception: Path, *norm: str) -> dict:
    """prepare → train → export → sample → evaluate, each a command; returns what they made."""
    write_tree(root / "images", per_class=2, classes=("a", "b"))
    prep = ["prepare", str(root / "images"), str(root / "data"), "--vae", str(vae)]
    assert cli.main([*prep, "--image-size", str(size), "--num-workers", "0", *norm]) == 0
    run = ["train", "--data", str(root / "data"), "--output-dir", str(root / "run"), *TRAIN]
    assert cli.main(run) == 0
    export = root / "model.safetensors"
    assert cli.main(["export", str(root / "run"), str(export)]) == 0
    sample = ["sample", "--ckpt", str(export), "--num-fid-samples", "8", "--batch-size", "4"]
    assert cli.main([*sample, *FAST, "--output-dir", str(root / "samples")]) == 0
    npz = root / "samples" / "samples_8.npz"
    ref = _reference_batch(root / "ref.npz", size)
    evaluate = ["evaluate", str(ref), str(npz), str(root / "eval"), "--inception", str(inception)]
    assert cli.main([*evaluate, "--device", "cpu"]) == 0
    return {
        "manifest": json.loads((root / "data" / "manifest.json").read_text()),
        "card": read_card(export),
        "images": np.load(npz)["arr_0"],
        "metrics": json.loads((root / "eval" / "metrics.json").read_text()),
        "export": export,
    }


@pytest.fixture(scope="module")
def inception_small(tmp_path_factory) -> Path:
    """A small Inception-like graph (the evaluator tests' own), resizing any image to 75."""
    from selfflow.eval.synthetic import inception_like_graph

    path = tmp_path_factory.mktemp("graphs") / "inception_75.pb"
    graph = inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    path.write_bytes(graph)
    return path


# prepare, train, export, sample and evaluate three times: minutes on a shared 2-core CPU
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, vaes, inception_small) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("worlds")
    with pytest.MonkeyPatch.context() as patch:  # reference features cached here, not in ~
        patch.setenv("SELFFLOW_CACHE", str(root / "cache"))
        return _worlds(root, vaes, inception_small)


def _worlds(root: Path, vaes: dict[str, Path], inception_small: Path) -> dict[str, dict]:
    return {
        "four_64": _end_to_end(root / "four_64", vaes["four"], 64, inception_small),
        "four_128": _end_to_end(root / "four_128", vaes["four"], 128, inception_small),
        "sixteen_32": _end_to_end(
            root / "sixteen_32", vaes["sixteen"], 32, inception_small, "--latent-norm", "channel"
        ),
    }


@SLOW
@pytest.mark.parametrize(
    ("world", "latent_shape", "pixels"),
    [
        ("four_64", (4, 16, 16), 64),
        ("four_128", (4, 32, 32), 128),
        ("sixteen_32", (16, 16, 16), 32),
    ],
)
def test_each_world_runs_from_prepare_to_evaluate_at_its_own_shape(
    worlds, world, latent_shape, pixels
):
    made = worlds[world]
    assert tuple(made["manifest"]["latent_shape"]) == latent_shape
    card, config = made["card"]
    # the model was built for the data's shape, and samples come out at the data's resolution
    assert (config.in_channels, config.input_size, config.input_size) == latent_shape
    assert made["images"].shape == (8, pixels, pixels, 3)
    # the export carries the dataset's convention, statistics included
    assert card.latent is not None
    assert card.latent.to_dict() == made["manifest"]["latent"]
    assert np.isfinite(made["metrics"]["fid"])


@SLOW
def test_the_sixteen_channel_world_decodes_with_its_shift_and_statistics(worlds):
    card, _ = worlds["sixteen_32"]["card"]
    assert (card.latent.channels, card.latent.scaling_factor) == (16, 1.5)
    assert card.latent.shift_factor == 0.25 and card.latent.mean is not None


@SLOW
def test_a_model_given_the_other_vae_is_refused_naming_both(worlds, vaes, tmp_path, capsys):
    for world, other in (("four_64", "sixteen"), ("sixteen_32", "four")):
        export = worlds[world]["export"]
        args = ["generate", "--ckpt", str(export), "--num", "1", *FAST, "--vae", str(vaes[other])]
        assert cli.main([*args, "--out", str(tmp_path / "g.png"), "--allow-vae-mismatch"]) == 1
        said = capsys.readouterr().err
        assert "16 channels" in said and "4 channels" in said, said
        assert not (tmp_path / "g.png").exists()
        # without the flag: the same message, not the encoder digests' (which offers the flag)
        assert cli.main([*args, "--out", str(tmp_path / "g.png")]) == 1
        said = capsys.readouterr().err
        assert "16 channels" in said and "allow-vae-mismatch" not in said, said


@SLOW
def test_generate_draws_at_the_checkpoints_resolution(worlds, tmp_path):
    from PIL import Image

    out = tmp_path / "g.png"
    args = ["generate", "--ckpt", str(worlds["four_128"]["export"]), "--num", "1", *FAST]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 128


# -- the cost of a step at other shapes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "latent_size"), [(4, 64), (16, 32)], ids=["XL/2 at 512", "16 channels at 256"]
)
def test_step_flops_at_other_shapes_agree_with_pytorchs_count(channels, latent_size):
    """The dry run's FLOPs per image (train_step_flops) against PyTorch's FLOP counter on a
    weightless XL/2 built by the trainer for that data shape (1 024 tokens at 512)."""
    from selfflow.train import train_step_flops
    from selfflow.train.config import TrainConfig, model_config
    from tests.train.test_fast_training import counted_step_flops

    config = TrainConfig(data="-", output_dir="-", steps=1, model="XL/2")
    xl = model_config(config, (channels, latent_size, latent_size), 1000)
    assert (xl.in_channels, xl.input_size) == (channels, latent_size)
    counted = counted_step_flops(xl, fast=True)
    assert counted == pytest.approx(train_step_flops(xl, teacher_layer=20), rel=5e-3)
    if latent_size == 64:  # 1 024 tokens: more than 4 times 256's work (attention is quadratic)
        at_256 = train_step_flops(model_config(config, (4, 32, 32), 1000), teacher_layer=20)
        assert xl.num_tokens == 1024 and 4.2 < counted / at_256 < 4.6


def test_the_dry_run_reports_flops_and_memory_at_the_datas_shape(normed, tmp_path, capsys):
    from selfflow.train import train_step_flops
    from selfflow.train.config import TrainConfig

    data = normed  # 16 × 16 × 16 latents of 32 pixels (the VAE's factor 2)
    args = ["train", "--dry-run", "--data", str(data), "--output-dir", str(tmp_path / "run")]
    args += ["--model", "tiny", "--steps", "10", "--device", "cpu", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    config = TrainConfig(data=str(data), output_dir="-", steps=1, model="tiny")
    resolved = config.resolve((16, 16, 16), 3)
    s = resolved.settings
    flops = train_step_flops(resolved.model, teacher_layer=s.teacher_layer, rep_weight=s.rep_weight)
    line = next(line for line in text.splitlines() if line.startswith("compute: "))
    number, unit = re.match(r"compute: ([\d.,]+) ([MGTP])FLOP per image per step", line).groups()
    said = float(number.replace(",", "")) * {"M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[unit]
    assert said == pytest.approx(flops, rel=5e-3)  # three figures, in the unit that fits
    assert "16×16×16 latents (64 tokens)" in line
    state = re.search(r"memory: ([\d.]+) (MiB|GiB) of training state per GPU", text)
    parameters = sum(p.numel() for p in SelfFlowDiT(resolved.model).parameters())
    expected = parameters * 20 / {"MiB": 2**20, "GiB": 2**30}[state.group(2)]
    assert float(state.group(1)) == pytest.approx(expected, abs=0.006)  # fp32 weights, grads,
    # Adam's two moments and the EMA: 20 bytes per parameter
    assert "--image-size 32 --latent-channels 16" in text  # the VAE's factor, as recorded
