"""Every ```python block of docs/ runs, as the page shows it, with local stand-ins.

The shell commands of the pages run in tests/test_readme_commands.py; this is the same promise
for the Python examples. Each block runs in a fresh namespace in a work folder of its own. The
stand-ins, and nothing else, change a block; they are listed here per page (``STAND_INS``: an
exact text replacement, which must be found, so an edited example fails here until its
stand-in is edited too) and per block (``PRELUDES``: names an example leaves to the reader):

- a VAE from the hub (FLUX's) and the released checkpoint and the SD-VAE are the tiny random model (8 × 8 latents) and the tiny
  diffusers VAE, on the CPU, with few sampler steps;
- files the examples open by name (``selfflow_imagenet256.pt``, ``model.pt``,
  ``/data/imagenet256-latents``) are made in the work folder from those stand-ins;
- ``x, tau, y`` (the network's inputs) have the stand-in's shape, and the digits arrays
  ``x, y, names`` of data.md are small random ones.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

STAND_INS = {
    "docs/api.md": [
        ('from_pretrained(device="cuda")', 'from_pretrained(RELEASED, vae=TINY_VAE, device="cpu")'),
        ("num_steps=250", "num_steps=3"),
        ('solver="heun", cfg_scale=1.5)', 'solver="heun", cfg_scale=1.5, num_steps=3)'),
        ("seed=0, batch_size=8)", "seed=0, batch_size=8, num_steps=3)"),
        (
            'num_samples=10_000, mode="ode")',
            'num_samples=8, mode="ode", num_steps=2, batch_size=4, vae=TINY_VAE, device="cpu")',
        ),
    ],
    "docs/latents.md": [
        (
            'AutoencoderKL.from_pretrained("black-forest-labs/FLUX.1-dev", subfolder="vae")',
            "AutoencoderKL.from_pretrained(TINY_VAE)",
        ),
    ],
    "docs/data.md": [
        ('LatentDataset("/data/imagenet256-latents")', "LatentDataset(PREPARED)"),
        ("np.array([5, 123_456, 7])", "np.array([5, 11, 7])"),
    ],
}


def python_blocks() -> list[tuple[str, int, str]]:
    """(page, block number, code) for every ```python block of docs/."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        name = page.relative_to(ROOT).as_posix()
        for number, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            found.append((name, number, match.group(1)))
    return found


def test_every_page_with_python_has_its_stand_ins_listed():
    pages = {page for page, _, _ in python_blocks()}
    assert pages, "no ```python block found: the reader is broken"
    assert pages == set(STAND_INS), (pages, set(STAND_INS))
    missing = [
        f"{page}: {old!r}"
        for page, pairs in STAND_INS.items()
        for old, _ in pairs
        if not any(old in code for where, _, code in python_blocks() if where == page)
    ]
    assert not missing, f"stand-ins for text no longer on the page (edit them too): {missing}"


def _prepared_dataset(folder: Path) -> Path:
    """A dataset stored as ``selfflow prepare`` stores one (mean and std of a posterior)."""
    from selfflow.data import write_dataset

    gen = np.random.default_rng(0)
    means = gen.standard_normal((12, 4, 8, 8)).astype(np.float32)
    stds = np.abs(gen.standard_normal((12, 4, 8, 8))).astype(np.float32) * 0.1
    labels = np.arange(12) % 3
    return write_dataset(folder, means, labels, stds=stds, class_names=["boat", "car", "tree"])


def _namespace(page: str, tmp_path: Path, tiny_checkpoint: str, tiny_vae_dir: str) -> dict:
    from selfflow.model.network import ModelConfig

    names: dict = {"RELEASED": tiny_checkpoint, "TINY_VAE": tiny_vae_dir, "__name__": "__doc__"}
    if page == "docs/api.md":
        config = ModelConfig.tiny()
        size = config.input_size
        names["x"] = torch.randn(2, config.in_channels, size, size)
        names["tau"] = torch.rand(2)
        names["y"] = torch.tensor([1, 2])
        shutil.copy(tiny_checkpoint, tmp_path / "selfflow_imagenet256.pt")
        shutil.copy(tiny_checkpoint, tmp_path / "model.pt")
    if page == "docs/data.md":
        names["PREPARED"] = str(_prepared_dataset(tmp_path / "prepared"))
        gen = np.random.default_rng(1)
        names["x"] = gen.random((20, 1, 8, 8), dtype=np.float32)
        names["y"] = np.arange(20) % 10
        names["names"] = [str(k) for k in range(10)]
    return names


@pytest.mark.parametrize(
    ("page", "number", "code"),
    python_blocks(),
    ids=[f"{page}#{number}" for page, number, _ in python_blocks()],
)
def test_every_python_example_of_the_docs_runs(
    page, number, code, tmp_path, monkeypatch, tiny_checkpoint, tiny_vae_dir, capsys
):
    for old, new in STAND_INS[page]:
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a stand-in missed is an error, not a download
    namespace = _namespace(page, tmp_path, tiny_checkpoint, tiny_vae_dir)
    exec(compile(code, f"{page} (python block {number})", "exec"), namespace)
    capsys.readouterr()
    if "images" in namespace:  # the pipeline's promise: uint8 NHWC, one image per label
        images = namespace["images"]
        assert str(images.dtype) == "uint8" and images.ndim == 4 and images.shape[-1] == 3
    if "v" in namespace:  # the velocity has the latents' shape
        assert namespace["v"].shape == namespace["x"].shape
    if page == "docs/latents.md":  # the VAE saved as a folder of its own, as the page says
        assert (tmp_path / "flux-vae" / "config.json").is_file()
    if "result" in namespace:
        assert os.path.isfile(namespace["result"].npz_path)
