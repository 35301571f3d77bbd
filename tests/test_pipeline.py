"""Per-sample randomness, the VAE's byte mapping, and the end-to-end pipeline on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.base import seeds
from selfflow.base.errors import ConfigurationError, DownloadError
from selfflow.base.finite import NonFiniteSamplesError
from selfflow.model.vae import load_vae, to_uint8
from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline

SHAPE = (4, 8, 8)


def test_draws_of_a_sample_do_not_depend_on_its_batch():
    batch = [10, 11, 12, 13, 14]
    alone = 12
    assert seeds.uniform_labels(31, [alone]).tolist() == [seeds.uniform_labels(31, batch)[2].item()]
    assert torch.equal(
        seeds.start_noise(31, [alone], SHAPE)[0], seeds.start_noise(31, batch, SHAPE)[2]
    )
    single = seeds.BrownianIncrements(31, [alone], SHAPE)
    batched = seeds.BrownianIncrements(31, batch, SHAPE)
    for step in range(4):
        assert torch.equal(single(step)[0], batched(step)[2])


def test_streams_differ_across_seeds_indices_and_purposes():
    a = seeds.start_noise(1, [0, 1], SHAPE)
    b = seeds.start_noise(2, [0], SHAPE)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], b[0])
    # Neighbouring seeds must not reuse each other's streams (seed + index would).
    assert not torch.equal(seeds.start_noise(1, [1], SHAPE)[0], seeds.start_noise(2, [0], SHAPE)[0])
    first_increment = seeds.BrownianIncrements(1, [0], SHAPE)(0)[0]
    assert not torch.equal(first_increment, a[0])


def test_brownian_increments_are_drawn_in_order():
    source = seeds.BrownianIncrements(0, [0], SHAPE)
    source(0)
    with pytest.raises(RuntimeError, match="expected step 1, got 3"):
        source(3)


def test_uniform_labels_cover_the_classes_evenly():
    labels = seeds.uniform_labels(5, range(20_000)).numpy()
    assert labels.min() >= 0 and labels.max() <= 999
    counts = np.bincount(labels, minlength=1000)
    # Chi-square with 999 degrees of freedom: mean 999, sd ≈ 44.7; 6 sd either side.
    chi2 = ((counts - 20.0) ** 2 / 20.0).sum()
    assert 999 - 6 * 44.7 < chi2 < 999 + 6 * 44.7


def test_balanced_labels_have_equal_counts_and_a_seeded_order():
    labels = seeds.balanced_labels(3, 5000)
    assert np.array_equal(np.bincount(labels, minlength=1000), np.full(1000, 5))
    assert np.array_equal(labels, seeds.balanced_labels(3, 5000))
    assert not np.array_equal(labels, seeds.balanced_labels(4, 5000))
    assert not np.array_equal(labels[:1000], np.sort(labels[:1000]))
    with pytest.raises(ConfigurationError, match="divisible by 1000"):
        seeds.balanced_labels(3, 1500)


def test_negative_indices_are_refused():
    with pytest.raises(ConfigurationError, match=">= 0"):
        seeds.start_noise(0, [-1], SHAPE)


def test_to_uint8_matches_the_official_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 5, 7, generator=gen) * 0.8
    images[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, -1.5, 2.0])
    got = to_uint8(images)
    x = images.double().permute(0, 2, 3, 1).numpy()
    want = np.floor(255 * np.clip((x + 1) / 2, 0, 1)).astype(np.uint8)
    assert got.dtype == np.uint8 and got.shape == (3, 5, 7, 3)
    # float32 arithmetic: equal to float64 except where 255·x rounds across a whole number.
    assert (got != want).mean() < 1e-3 and np.abs(got.astype(int) - want).max() <= 1
    assert got[0, 0, :4, 0].tolist() == [0, 255, 0, 255]


def test_to_uint8_of_a_bf16_decoder_output_rounds_like_bf16_arithmetic():
    """The official mapping runs on the bf16 decoder output: re-compute it step by step with
    numpy's bfloat16 (ml_dtypes), rounding after every operation as bf16 arithmetic does."""
    from ml_dtypes import bfloat16

    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 3, 16, 16, generator=gen) * 2.4 - 1.2).bfloat16()
    got = to_uint8(images)
    x = images.float().permute(0, 2, 3, 1).numpy().astype(bfloat16)
    step = ((x.astype(np.float64) + 1).astype(bfloat16).astype(np.float64) / 2).astype(bfloat16)
    step = np.clip(step.astype(np.float64), 0, 1).astype(bfloat16)
    step = (step.astype(np.float64) * 255).astype(bfloat16).astype(np.float64)
    np.testing.assert_array_equal(got, np.floor(step).astype(np.uint8))
    exact = np.floor(255 * np.clip((images.double().permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1))
    assert (got > exact).mean() > 0.02, "bf16 rounding must show (this is not the float32 map)"


def test_to_uint8_refuses_nan_and_names_the_rows():
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteSamplesError, match=r"rows \[1\]") as caught:
        to_uint8(images)
    assert caught.value.indices == [1]


def test_vae_loading_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="config.json"):
        load_vae(tmp_path / "empty")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DownloadError, match="--vae FOLDER"):
        load_vae("someone/absent-vae")
    # what can only be a folder, missing, is a typo to name, not a repository to ask for
    for typo in ("vae44", str(tmp_path / "no-vae"), "./vaes/four", "a/b/c"):
        with pytest.raises(ConfigurationError, match=r"there is no VAE folder .* not a hub id"):
            load_vae(typo)


def test_settings_validation():
    with pytest.raises(ConfigurationError, match="mode"):
        SamplerSettings(mode="flow")
    with pytest.raises(ConfigurationError, match="at least 2"):
        SamplerSettings(num_steps=1)
    with pytest.raises(ConfigurationError, match="cfg_scale"):
        SamplerSettings(cfg_scale=-1)
    with pytest.raises(ConfigurationError, match=r"guidance_interval\[0\] \(0.8\) must not exceed"):
        SamplerSettings(guidance_interval=(0.8, 0.2))
    assert SamplerSettings(mode="SDE", solver="Euler").mode == "sde"


# ----------------------------------------------------------------------------------------------
# End to end on the tiny model and tiny VAE


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, tiny_vae_dir) -> SelfFlowPipeline:
    return SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")


def assert_same_up_to_reordering(a: np.ndarray, b: np.ndarray) -> None:
    """At most 1 level apart, in at most 0.1 % of the values (float reordering across batches)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 1e-3


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_a_sample_alone_equals_the_same_sample_in_a_batch(pipe, mode):
    labels = [3, 100, 999, 1000, 42]
    batch = pipe(labels, seed=31, num_steps=12, mode=mode, indices=range(20, 25))
    alone = pipe([labels[3]], seed=31, num_steps=12, mode=mode, indices=[23])
    assert batch.shape == (5, 16, 16, 3) and batch.dtype == np.uint8
    assert_same_up_to_reordering(alone[0], batch[3])
    assert batch.std() > 5, "images should not be flat"


def test_seed_and_label_change_the_image(pipe):
    base = pipe([7], seed=1, num_steps=6)
    assert not np.array_equal(base, pipe([7], seed=2, num_steps=6))
    assert not np.array_equal(base, pipe([8], seed=1, num_steps=6))
    np.testing.assert_array_equal(base, pipe([7], seed=1, num_steps=6))


def test_guidance_changes_the_image_only_when_scaled(pipe):
    plain = pipe([7, 8], seed=1, num_steps=6)
    assert not np.array_equal(plain, pipe([7, 8], seed=1, num_steps=6, cfg_scale=4.0))
    # The SDE's last evaluation is at tau = 0.04: an interval [0, 0.01] never guides it.
    np.testing.assert_array_equal(
        plain, pipe([7, 8], seed=1, num_steps=6, cfg_scale=4.0, guidance_interval=(0.0, 0.01))
    )


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_a_nan_in_one_guided_pass_names_that_sample_by_its_index(
    tiny_checkpoint, tiny_vae_dir, mode
):
    """Guided calls run the conditional and the null pass of every sample in one batch; a NaN
    in sample 1's null pass only must be reported as that sample's index, and no other."""
    poisoned = SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")
    inner = poisoned.model_fn
    null = poisoned.model.config.null_class

    def model_fn(x, tau, y):
        out = inner(x, tau, y).clone()
        if len(y) == 6:  # guided: rows 0-2 conditional, rows 3-5 null
            out[4] = float("nan")
            assert y[4] == null and y[1] != null
        return out

    poisoned.model_fn = model_fn
    with pytest.raises(NonFiniteSamplesError, match=r"sample indices \[41\]") as caught:
        poisoned([5, 6, 7], seed=3, num_steps=4, mode=mode, cfg_scale=2.0, indices=[40, 41, 42])
    assert caught.value.indices == [41]
    assert ("SDE step" if mode == "sde" else "ODE interval") in str(caught.value)


def test_a_nan_in_the_second_decode_chunk_names_that_sample_by_its_index(pipe, monkeypatch):
    """The VAE decodes 8 latents per call: a NaN in row 1 of its second call is row 9 of the
    12 images, reported as that sample's index."""
    from selfflow.model.vae import DECODE_BATCH

    real, calls = pipe.autoencoder.decode, []

    def decode(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        calls.append(len(z))
        if len(calls) == 2:
            out.sample[1] = float("nan")
        return out

    monkeypatch.setattr(pipe.autoencoder, "decode", decode)
    with pytest.raises(NonFiniteSamplesError, match=r"decoding .* \[109\]") as caught:
        pipe(list(range(12)), seed=1, num_steps=2, indices=range(100, 112))
    assert calls == [DECODE_BATCH, DECODE_BATCH] and caught.value.indices == [
        100 + DECODE_BATCH + 1
    ]


def test_pipeline_rejects_bad_labels(pipe):
    with pytest.raises(ConfigurationError, match=r"\[0, 1000\]"):
        pipe([1001])
    with pytest.raises(ConfigurationError, match="integers"):
        pipe([1.5])
    with pytest.raises(ConfigurationError, match="2 labels but 1 indices"):
        pipe([1, 2], indices=[0])


def test_generate_command_writes_a_grid(tiny_checkpoint, tiny_vae_dir, tmp_path):
    from PIL import Image

    from selfflow.cli import main

    out = tmp_path / "grid.png"
    argv = ["generate", "--ckpt", tiny_checkpoint, "--vae", tiny_vae_dir, "--class", "207", "1"]
    options = ["--num", "5", "--num-steps", "4", "--batch-size", "2", "--device", "cpu"]
    assert main([*argv, *options, "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 16 + 2, 3 * 16 + 4, 3)
    # Cells are samples 0..4 with labels cycling 207, 1, drawn as the pipeline draws them alone,
    # though the command ran them in batches of 2.
    pipe = SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")
    for index, (row, col) in ((0, (0, 0)), (4, (1, 1))):
        cell = grid[row * 18 : row * 18 + 16, col * 18 : col * 18 + 16]
        alone = pipe([207], seed=0, num_steps=4, indices=[index])[0]
        assert_same_up_to_reordering(cell, alone)


def test_bf16_fast_path_draws_the_same_images_within_bf16_tolerance(tiny_checkpoint, tiny_vae_dir):
    reference = SelfFlowPipeline.from_pretrained(tiny_checkpoint, tiny_vae_dir, device="cpu")
    fast = SelfFlowPipeline.from_pretrained(
        tiny_checkpoint, tiny_vae_dir, device="cpu", dtype=torch.bfloat16, compile=False
    )
    assert fast.model_fn is not fast.model
    settings = SamplerSettings(num_steps=12)
    labels, indices = torch.tensor([5, 600, 1000]), [0, 1, 2]
    want = reference.sample_latents(labels, indices, 3, settings)
    got = fast.sample_latents(labels, indices, 3, settings)
    assert 1e-5 < float((got - want).norm() / want.norm()) < 1e-2
