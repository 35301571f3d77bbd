"""Keyed randomness: a sample is a function of (seed, index), a training step of (seed, step).

The official sampler draws noise for a whole batch from a per-rank generator, so the images
depend on the batch size and the number of GPUs. Here every random quantity of sample ``i`` —
its label, its start noise, each Brownian increment — comes from its own stream keyed by
``(purpose, seed, i)`` (:func:`keyed_rng`), and so does every random number of a training step
(:mod:`selfflow.train.streams`). Any world size, batch size, order or restart gives the same
numbers for sample ``i``; drawing on the CPU makes them independent of the GPU model too.

A stream is numpy's counter-based Philox generator whose 128-bit key is the first 16 bytes of
the sha256 of ``(purpose, seed, index)``: every bit of the key selects the stream. (torch's CPU
generator, mt19937, keeps only the low 32 bits of its seed, so ~10⁵ keyed streams would already
contain pairs drawing identical numbers; it is seeded only where torch's own initialisers need
it, through :func:`torch_seed`.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from selfflow.base.errors import ConfigurationError

NUM_CLASSES = 1000


def _digest(seed: int, index: int, purpose: str) -> bytes:
    """A cryptographic hash keeps the streams of neighbouring indices and seeds unrelated (plain
    ``seed + index`` would make run 31's sample 1 equal run 32's sample 0)."""
    return hashlib.sha256(f"selfflow/{purpose}/{int(seed)}/{int(index)}".encode()).digest()


def stream_key(seed: int, index: int, purpose: str) -> int:
    """The 128-bit key of the stream ``purpose`` of ``index`` (a sample or a training step)
    under the run seed ``seed``."""
    return int.from_bytes(_digest(seed, index, purpose)[:16], "little")


def keyed_rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """The random stream ``purpose`` of ``index`` under ``seed``: Philox keyed by all 128 bits of
    :func:`stream_key`, counter from 0. Two keys that differ in any bit give unrelated streams."""
    return np.random.Generator(np.random.Philox(key=stream_key(seed, index, purpose)))


def torch_seed(seed: int, index: int, purpose: str) -> int:
    """A seed for torch's generator, for code that can only draw from it (the network's
    initialisers). mt19937 keeps 32 bits of a seed, so this is 32 bits: two run seeds share such
    a stream with probability 2⁻³²; never use it for many keys (see :func:`keyed_rng`)."""
    return int.from_bytes(_digest(seed, index, purpose)[:4], "little")


def normals(rng: np.random.Generator, shape: Sequence[int]) -> torch.Tensor:
    """Standard normals of ``shape`` from ``rng`` as a float32 CPU tensor."""
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))


def uniforms(rng: np.random.Generator, shape: Sequence[int] | int) -> torch.Tensor:
    """``U[0, 1)`` of ``shape`` from ``rng`` as a float32 CPU tensor (24-bit resolution)."""
    return torch.from_numpy(rng.random(shape, dtype=np.float32))


def _as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    values = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    if any(i < 0 for i in values):
        raise ConfigurationError(f"sample indices must be >= 0; got {min(values)}")
    return values


def uniform_labels(
    seed: int, indices: Sequence[int], num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Labels drawn uniformly from ``[0, num_classes)``, one stream per sample (paper protocol)."""
    labels = [int(keyed_rng(seed, i, "label").integers(num_classes)) for i in _as_indices(indices)]
    return torch.tensor(labels, dtype=torch.int64)


def balanced_labels(seed: int, num_samples: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Exactly ``num_samples / num_classes`` of each class, in a seeded shuffled order.

    The whole plan is one permutation (it cannot be per sample), keyed by the seed alone.
    """
    if num_samples <= 0 or num_samples % num_classes:
        raise ConfigurationError(
            f"class-balanced sampling needs a number of samples divisible by {num_classes} "
            f"(equal images per class); got {num_samples}"
        )
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), num_samples // num_classes)
    return keyed_rng(seed, 0, "balanced-labels").permutation(labels)


def start_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal start latents, ``(len(indices), *shape)`` float32 on the CPU."""
    return torch.stack([normals(keyed_rng(seed, i, "noise"), shape) for i in _as_indices(indices)])


class BrownianIncrements:
    """The standard-normal ξ of every SDE step, one stream per sample.

    Call it with the step number 0, 1, 2, … in order; each call returns ``(B, *shape)`` on
    ``device``. Step ``k`` of sample ``i`` is always the ``k``-th draw of sample ``i``'s stream,
    whatever else is in the batch.
    """

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        shape: Sequence[int],
        device: str | torch.device = "cpu",
    ) -> None:
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self._streams = [keyed_rng(seed, i, "brownian") for i in _as_indices(indices)]
        self._next_step = 0

    def __call__(self, step: int) -> torch.Tensor:
        if step != self._next_step:
            raise RuntimeError(
                f"Brownian increments must be drawn in step order: expected step "
                f"{self._next_step}, got {step}"
            )
        self._next_step += 1
        draws = [normals(stream, self.shape) for stream in self._streams]
        return torch.stack(draws).to(self.device, non_blocking=True)
