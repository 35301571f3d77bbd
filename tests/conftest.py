"""Shared test fixtures: tiny random models whose every layer does something."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from selfflow.model.network import ModelConfig, SelfFlowDiT


class NetworkUsed(AssertionError):
    """A test tried to reach an address off this machine; tests never touch the network."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse every connection to an address that is not loopback, in the test process.

    A test that would download (a hub call, a URL) fails at once with the address named,
    instead of passing here because the download failed and then hanging or passing by luck on
    a machine that is online. Loopback stays open for the local HTTP server and torchrun.
    """
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _is_loopback(host):
            raise NetworkUsed(f"a test tried to connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", _local_getaddrinfo(socket.getaddrinfo))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_getaddrinfo(real):
    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(str(host)):
            raise NetworkUsed(f"a test tried to resolve {host!r}")
        return real(host, *args, **kwargs)

    return getaddrinfo


def randomize_(model: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with fan-in-scaled noise.

    DiT's adaLN-Zero initialisation zeroes every block and the output layer, so a freshly built
    model is the zero function; tests need one where every weight matters.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fan_in = param.shape[-1] if param.dim() > 1 else 16
            if "embedding_table" in name:
                fan_in = 1
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(noise * gain / fan_in**0.5)
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> SelfFlowDiT:
    return randomize_(SelfFlowDiT(tiny_config), seed=1).eval()


def make_tiny_vae(latent_channels: int = 4, blocks: tuple[int, ...] = (8, 16), **config):
    """A diffusers AutoencoderKL with the SD-VAE's interface (4 latent channels) at toy size:
    one downsampling, so 8 × 8 latents decode to 16 × 16 RGB images.

    Other latent spaces for the latent-convention tests: ``latent_channels`` (16: SD3/FLUX's),
    ``blocks`` (one per level: three levels downsample by 4) and config entries such as
    ``scaling_factor`` and ``shift_factor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A tiny VAE written with ``save_pretrained``, as the real one is stored on the hub."""
    folder = tmp_path_factory.mktemp("tiny_vae")
    make_tiny_vae().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random Self-Flow model saved by ``save_model`` (stores its config)."""
    from selfflow.model.checkpoint import save_model

    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pt"
    save_model(randomize_(SelfFlowDiT(ModelConfig.tiny()), seed=7, gain=0.5), path)
    return str(path)


# -- read-only folders and full disks (root only: tmpfs mounts) ---------------------------------


class Mounts:
    """tmpfs mounts below a test's folder, all unmounted at the end of the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def mount(self, name: str, size: str | int) -> Path:
        """An empty tmpfs of ``size`` (bytes, or tmpfs's ``16M``) at ``root/name``."""
        folder = self.root / name
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        self.mounted.append(folder)
        return folder

    def read_only(self, name: str = "ro") -> Path:
        """An empty read-only file system."""
        folder = self.mount(name, "1M")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    def full(self, name: str = "full", leave: int = 0, size: str = "16M") -> Path:
        """A file system with ``leave`` bytes free (rounded to pages), filled by ``filler``."""
        folder = self.mount(name, size)
        self.fill(folder, leave)
        return folder

    def fill(self, folder: Path, leave: int) -> None:
        filler = folder / "filler"
        free = shutil.disk_usage(folder).free
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, max(free - leave, 1))
        finally:
            os.close(fd)

    def free_space(self, folder: Path) -> None:
        """What a user does: delete what filled the disk."""
        (folder / "filler").unlink()

    def unmount_all(self) -> None:
        for folder in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def mounts(tmp_path):
    found = Mounts(tmp_path)
    try:
        yield found
    finally:
        found.unmount_all()
