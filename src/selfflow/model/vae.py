"""SD-VAE: decoding latents → uint8 NHWC images exactly as the official sampler does, and
encoding images → the posterior (mean, std) that training data stores.

The official code decodes ``z / 0.18215`` with diffusers' ``AutoencoderKL`` in bf16 and maps
``[-1, 1]`` to bytes with ``floor(255 · clamp((x + 1) / 2, 0, 1))`` on the decoder's
output tensor, so in bf16 too. That arithmetic is kept here, in the decoder's own dtype: bf16
rounds ``255·x`` to a whole number above 128, so about one byte in ten comes out one level
higher than a float32 mapping would give (mean +0.09 levels). Parity with the released numbers
needs the same bytes; a float32 VAE gives the float32 mapping."""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from selfflow.base.errors import ConfigurationError, DownloadError
from selfflow.base.finite import check_rows
from selfflow.model.card import SD_VAE_ID
from selfflow.model.latents import SD_VAE, LatentConvention

__all__ = [
    "SD_VAE_ID",
    "decode",
    "encode_posterior",
    "encoder_identity",
    "encoder_record",
    "encoder_record_of",
    "load_vae",
]
# Latents per decoder call, always (see :func:`decode`): small enough that decoding one image
# costs little, large enough to keep a GPU busy (8 images of 256 x 256 are 0.5 M pixels).
DECODE_BATCH = 8


def load_vae(
    name_or_path: str | os.PathLike = SD_VAE_ID,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
):
    """Load a diffusers ``AutoencoderKL`` from a hub id or a local ``save_pretrained`` folder."""
    from diffusers import AutoencoderKL

    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigurationError(
            f"{local} is not a diffusers AutoencoderKL folder: expected config.json and "
            f"diffusion_pytorch_model.safetensors inside (save it with vae.save_pretrained(folder))"
        )
    if not local.exists() and not could_be_hub_id(source):
        raise ConfigurationError(missing_folder(source))
    unreachable = None  # why the hub cannot be asked now: then its cache alone, at once
    if not local.exists():
        from selfflow.base.download import hub_unreachable

        unreachable = hub_unreachable(source, "config.json")
    try:
        # torch_dtype here rather than .to(dtype) below: same weights, without diffusers'
        # warning about casting after loading. low_cpu_mem_usage needs accelerate; asking for
        # it without accelerate makes diffusers print a warning on every run, so ask only then.
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument that it deprecated, and the hub
            # warns about it on every load from the hub: about their code, not the user's
            warnings.filterwarnings(
                "ignore", message=r"The `local_dir_use_symlinks` argument is deprecated"
            )
            vae = AutoencoderKL.from_pretrained(
                str(local) if local.exists() else source,
                torch_dtype=dtype,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
                **({"local_files_only": True} if unreachable else {}),
            )
    except (OSError, ValueError) as error:
        from selfflow.base.download import hub_failure_cause

        cause = (
            f"{type(error).__name__}: {str(error).splitlines()[0]}"
            if local.exists()
            else hub_failure_cause(error, unreachable)
        )
        raise DownloadError(
            f"could not load the VAE {source!r}: {cause}. Fetch it where there is internet "
            f"access with `selfflow download vae` (into huggingface_hub's cache, which compute "
            f"nodes may share; set HF_HUB_OFFLINE=1 there), or {_vae_by_hand(source)}"
        ) from error
    return vae.to(device=device).eval().requires_grad_(False)


def could_be_hub_id(source: str) -> bool:
    """Whether ``source`` has the form of a hub repository id, ``owner/name`` (names of
    letters, digits, ``-``, ``_`` and ``.``): an absolute path, ``./vae``, ``~/vae``,
    ``a/b/c`` or a bare ``vae`` can only mean a local folder, and a missing one is a typo to
    name, not a repository to ask the hub for."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source) is not None


def missing_folder(source: str) -> str:
    """The one line for a ``--vae`` that is neither a folder here nor a hub id."""
    where = Path(source).expanduser().absolute()
    looked = "" if str(where) == source else f" (looked for {where})"
    return (
        f"there is no VAE folder {source}{looked}, and it is not a hub id (owner/name, e.g. "
        f"{SD_VAE_ID}): pass a diffusers AutoencoderKL folder (config.json inside) or a hub id"
    )


def _vae_by_hand(name: str) -> str:
    """How to get a hub VAE's folder without the hub's client, in words (ends the message)."""
    return (
        f"download the diffusers folder of {name} (config.json and "
        f"diffusion_pytorch_model.safetensors, from https://huggingface.co/{name}/tree/main) "
        f"into one folder and pass it with --vae FOLDER."
    )


def vae_source(name_or_path: str | os.PathLike) -> str:
    """Where :func:`load_vae` would find ``name_or_path``, said without loading or downloading
    it (a dry run's plan): a local folder, huggingface_hub's cache, or nowhere yet (a start
    would download it). A local folder that is not a diffusers folder is refused as there."""
    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigurationError(
                f"{local} is not a diffusers AutoencoderKL folder: expected config.json inside"
            )
        return f"the local folder {local}"
    if local.is_absolute():  # a recorded folder, never a hub id
        return f"the local folder {local}, which is NOT on this machine (pass --vae)"
    if not could_be_hub_id(source):
        raise ConfigurationError(missing_folder(source))
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return f"{source} in huggingface_hub's cache"
    return (
        f"{source}, not in huggingface_hub's cache here: a start downloads it (offline nodes: "
        f"`selfflow download vae` where there is internet, into a cache they share)"
    )


def download_vae(name: str = SD_VAE_ID) -> Path:
    """Fetch the VAE into huggingface_hub's cache, exactly where :func:`load_vae` looks it up.

    It is loaded once (on the CPU) through the same call as every run makes, so whatever files
    that call needs are in the cache afterwards; returns the cached folder. Its error says why
    the hub could not be used and how to get the folder by hand (not to run this again).
    """
    try:
        load_vae(name, dtype=torch.float32)
    except DownloadError as error:
        why = str(error).split(". Fetch it where there is internet access", 1)[0]
        raise DownloadError(
            f"{why.replace('could not load', 'could not download', 1)}. Without the hub, "
            f"{_vae_by_hand(name)}"
        ) from error
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    return Path(config).parent if isinstance(config, str) else Path(name)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in about [-1, 1] → ``(B, H, W, 3)`` uint8 via ``floor(255·clamp((x+1)/2))``.

    Each operation runs in ``images.dtype`` (bf16 for the official decoder), as the official
    sampler computes it; the cast to uint8 truncates, which is the floor for values ≥ 0.
    Raises :class:`~selfflow.base.finite.NonFiniteSamplesError` naming the rows with a value that is
    not finite: NaN would otherwise silently become 0.
    """
    check_rows(images, "decoding")
    scaled = ((images + 1) / 2).clamp(0, 1) * 255
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.no_grad()
def decode(
    vae,
    latents: torch.Tensor,
    batch: int | None = DECODE_BATCH,
    convention: LatentConvention = SD_VAE,
) -> np.ndarray:
    """Decode a model's latents to uint8 NHWC images, undoing ``convention`` first
    (:meth:`~selfflow.model.latents.LatentConvention.denormalise`; SD-VAE's: ``z / 0.18215``).

    Every call of the decoder sees exactly ``batch`` latents: the latents are cut into chunks
    of ``batch`` and a short last chunk is padded with copies of its last latent, whose images
    are dropped. Why: the decoder's kernels (bf16 on CPU and GPU) are chosen per batch shape
    and round differently per shape, so one latent decoded alone and the same latent decoded
    among 63 others differ by a level or more in some pixels; at one shape, a row's output does
    not depend on its neighbours. A fixed shape therefore makes an image's bytes a function of
    its latent alone: the same whatever the sampling batch, a short last batch or a resume.
    ``batch=None`` decodes all latents in one call (one shape per call; for probes only).
    """
    count = int(latents.shape[0])
    if count == 0:
        raise ConfigurationError("no latents to decode")
    if batch is not None and batch < 1:
        raise ConfigurationError(f"the decode batch must be at least 1; got {batch}")
    param = next(vae.parameters())
    size = count if batch is None else batch
    images = []
    for start in range(0, count, size):
        chunk = latents[start : start + size]
        real = int(chunk.shape[0])
        if real < size:
            chunk = torch.cat([chunk, chunk[-1:].expand(size - real, *chunk.shape[1:])])
        chunk = convention.denormalise(chunk).to(device=param.device, dtype=param.dtype)
        images.append(vae.decode(chunk).sample[:real])
    return to_uint8(torch.cat(images))


@torch.no_grad()
def encode_posterior(vae, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posterior ``(mean, std)`` of uint8 NHWC images, as float32 NCHW on the CPU.

    Images are mapped to [-1, 1] by ``x / 127.5 − 1`` in float32 on the VAE's device (bytes
    travel to the GPU, not floats), then cast to the VAE's dtype. Training stores both moments
    and draws ``mean + std·n`` afresh every step, rather than freezing one posterior sample.
    """
    pixels = torch.as_tensor(images)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images (B, H, W, 3); got {pixels.dtype} {tuple(pixels.shape)}"
        )
    param = next(vae.parameters())
    x = pixels.to(param.device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    posterior = vae.encode(x.to(param.dtype)).latent_dist
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def encoder_identity(vae) -> str:
    """sha256 of the weights that shape the posterior (encoder and quant_conv), in float32.

    Computed from the loaded tensors, not from a file, so a hub id and a local copy of the same
    VAE agree, and VAEs that differ only in their decoder (sd-vae-ft-ema and sd-vae-ft-mse
    share the encoder) give the same latents and the same identity.
    """
    import hashlib

    digest = hashlib.sha256()
    state = vae.state_dict()
    for name in sorted(state):
        if not name.startswith(("encoder.", "quant_conv.")):
            continue
        tensor = state[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def encoder_record(vae) -> str:
    """``encoder-sha256:<hex>``: the VAE identity that dataset manifests and model cards record.

    The VAE must be loaded in float32: a bf16 copy's rounded weights hash differently, so a
    sampler's bf16 decoder cannot vouch for itself (see :func:`encoder_record_of`).
    """
    dtype = next(vae.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"the encoder's identity is taken from float32 weights; got {dtype}")
    return f"encoder-sha256:{encoder_identity(vae)}"


def encoder_record_of(name_or_path: str | os.PathLike) -> str:
    """:func:`encoder_record` of a VAE by name: loaded once more, in float32 on the CPU
    (about a second for SD-VAE), for the check of a ``--vae`` given by hand."""
    return encoder_record(load_vae(name_or_path, dtype=torch.float32))
