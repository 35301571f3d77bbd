"""Per-sample randomness: a sample is a function of (seed, index) alone.

The official sampler draws noise for a whole batch from a per-rank generator, so the images
depend on the batch size and the number of GPUs. Here every random quantity of sample ``i`` —
its label, its start noise, each Brownian increment — comes from a CPU generator seeded from a
hash of ``(purpose, seed, i)``. Any world size, batch size, order or restart gives the same
numbers for sample ``i``; drawing on the CPU makes them independent of the GPU model too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from selfflow.errors import ConfigurationError

NUM_CLASSES = 1000


def stream_seed(seed: int, index: int, purpose: str) -> int:
    """A 63-bit seed for the stream ``purpose`` of sample ``index`` under the run seed ``seed``.

    A cryptographic hash keeps the streams of neighbouring indices and seeds unrelated (plain
    ``seed + index`` would make run 31's sample 1 equal run 32's sample 0).
    """
    digest = hashlib.sha256(f"selfflow/{purpose}/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_generator(seed: int, index: int, purpose: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, index, purpose))


def _as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    values = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    if any(i < 0 for i in values):
        raise ConfigurationError(f"sample indices must be >= 0; got {min(values)}")
    return values


def uniform_labels(
    seed: int, indices: Sequence[int], num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Labels drawn uniformly from ``[0, num_classes)``, one stream per sample (paper protocol)."""
    labels = [
        int(torch.randint(num_classes, (1,), generator=sample_generator(seed, i, "label")))
        for i in _as_indices(indices)
    ]
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
    rng = np.random.Generator(np.random.Philox(stream_seed(seed, 0, "balanced-labels")))
    return rng.permutation(labels)


def start_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal start latents, ``(len(indices), *shape)`` float32 on the CPU."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=sample_generator(seed, i, "noise"))
            for i in _as_indices(indices)
        ]
    )


class BrownianIncrements:
    """The standard-normal ξ of every SDE step, one generator per sample.

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
        self._generators = [sample_generator(seed, i, "brownian") for i in _as_indices(indices)]
        self._next_step = 0

    def __call__(self, step: int) -> torch.Tensor:
        if step != self._next_step:
            raise RuntimeError(
                f"Brownian increments must be drawn in step order: expected step "
                f"{self._next_step}, got {step}"
            )
        self._next_step += 1
        draws = [torch.randn(self.shape, generator=g) for g in self._generators]
        return torch.stack(draws).to(self.device, non_blocking=True)
