"""The VAE decode sees one batch shape, so an image's bytes depend on its latent alone.

A bf16 decoder's kernels are chosen per batch shape and round differently per shape (on this
CPU a latent decoded alone and the same latent among others differ by a level in some pixels),
while at one shape a row does not depend on its neighbours. These tests hold the decode to that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.model import vae
from tests.conftest import make_tiny_vae


@pytest.fixture(scope="module")
def bf16_vae():
    return make_tiny_vae().to(torch.bfloat16)


def latents(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # about the spread of real SD latents in the model's scale (std near 1 after / 0.18215)
    return torch.randn(count, 4, 8, 8, generator=generator) * 0.18215 * 4


def plain_decode(model, z: torch.Tensor) -> np.ndarray:
    """The reference: one decoder call on exactly these latents, floor(255·clamp((x+1)/2, 0, 1))
    in the decoder's dtype, written out here rather than taken from selfflow.model.vae."""
    with torch.no_grad():
        x = model.decode((z / 0.18215).to(torch.bfloat16)).sample
    x = torch.clamp((x + 1) / 2, 0, 1) * 255
    return torch.floor(x).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_every_decoder_call_sees_decode_batch_latents(bf16_vae, monkeypatch):
    seen = []
    inner = bf16_vae.decode

    def recording(z, *args, **kwargs):
        seen.append(z.shape[0])
        return inner(z, *args, **kwargs)

    monkeypatch.setattr(bf16_vae, "decode", recording)
    for count in (1, 3, vae.DECODE_BATCH, vae.DECODE_BATCH + 1, 2 * vae.DECODE_BATCH + 5):
        seen.clear()
        images = vae.decode(bf16_vae, latents(count))
        assert images.shape == (count, 16, 16, 3) and images.dtype == np.uint8
        assert seen == [vae.DECODE_BATCH] * -(-count // vae.DECODE_BATCH)


def test_an_image_is_the_same_decoded_alone_in_a_short_batch_or_in_a_full_one(bf16_vae):
    z = latents(4 * vae.DECODE_BATCH)
    # the reference: plain decoder calls on full chunks of DECODE_BATCH real latents
    reference = np.concatenate(
        [plain_decode(bf16_vae, z[s : s + vae.DECODE_BATCH]) for s in range(0, len(z), 8)]
    )
    np.testing.assert_array_equal(vae.decode(bf16_vae, z), reference)
    alone = np.concatenate([vae.decode(bf16_vae, z[i : i + 1]) for i in range(len(z))])
    np.testing.assert_array_equal(alone, reference)
    for cut in (3, 5, 13):  # short last chunks, chunks that straddle the decoder's
        parts = np.concatenate(
            [vae.decode(bf16_vae, z[s : s + cut]) for s in range(0, len(z), cut)]
        )
        np.testing.assert_array_equal(parts, reference)
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(vae.decode(bf16_vae, z[order]), reference[order.numpy()])


def test_the_shape_matters_to_the_decoder_itself(bf16_vae):
    """Why the fixed shape is needed: the plain decoder, one latent at a time, rounds some
    pixels differently from the same latents decoded together (if this ever stops holding,
    the fixed shape costs a little time for nothing, but stays correct)."""
    z = latents(4 * vae.DECODE_BATCH)
    together = plain_decode(bf16_vae, z)
    alone = np.concatenate([plain_decode(bf16_vae, z[i : i + 1]) for i in range(len(z))])
    assert (together != alone).any()


def test_decode_refuses_nothing_to_decode_and_a_bad_batch(bf16_vae):
    from selfflow.base.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no latents"):
        vae.decode(bf16_vae, latents(0))
    with pytest.raises(ConfigurationError, match="at least 1"):
        vae.decode(bf16_vae, latents(2), batch=0)


def test_vae_source_says_where_a_start_would_load_it_without_loading(tmp_path, monkeypatch):
    folder = tmp_path / "vae"
    folder.mkdir()
    with pytest.raises(vae.ConfigurationError, match="not a diffusers AutoencoderKL folder"):
        vae.vae_source(folder)
    (folder / "config.json").write_text("{}")  # not loadable, and not loaded: only looked up
    assert vae.vae_source(folder) == f"the local folder {folder}"
    # a hub id: looked up in huggingface_hub's cache (a temporary, empty one here), never fetched
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "not in huggingface_hub's cache here" in vae.vae_source("someone/some-vae")
    snapshot = tmp_path / "hub" / "models--someone--some-vae" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--some-vae" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--some-vae" / "refs" / "main").write_text("0" * 40)
    assert vae.vae_source("someone/some-vae") == "someone/some-vae in huggingface_hub's cache"
