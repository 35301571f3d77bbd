"""The FID batch's settings and result: :class:`BatchConfig`, :class:`BatchResult`.

The config is checked here, once, before any file is read (:meth:`BatchConfig.validate`);
the batch shape and padding rules that make a sample's bytes independent of how the work is
cut live here too, as they depend on the settings alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.base.errors import ConfigurationError
from selfflow.sampling.settings import (
    DEFAULT_CFG_SCALE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_MODE,
    DEFAULT_SEED,
    DEFAULT_SOLVER,
    OPTION_NAMES,
    SamplerSettings,
)

DTYPES = ("float32", "bfloat16")
VAE_DTYPE = "bfloat16"  # the official sampler decodes in bf16


@dataclass
class BatchConfig:
    """Every option of ``selfflow sample`` (the official ones first).

    Build one in Python and pass it to :func:`selfflow.batch.generate_fid_batch`;
    :meth:`validate` runs first there, so a bad value fails before anything is loaded.
    """

    checkpoint: str | os.PathLike | None = None
    output_dir: str | os.PathLike = "samples"
    num_samples: int = 50_000
    batch_size: int = 64
    num_steps: int | None = None  # None: the mode's default (SDE 250, ODE 50)
    mode: str = DEFAULT_MODE
    seed: int = DEFAULT_SEED
    cfg_scale: float = DEFAULT_CFG_SCALE
    guidance_low: float = DEFAULT_GUIDANCE_INTERVAL[0]
    guidance_high: float = DEFAULT_GUIDANCE_INTERVAL[1]
    save_images: bool = False
    solver: str = DEFAULT_SOLVER
    vae: str | None = None  # None: the VAE the checkpoint's card records (SD-VAE if none)
    allow_vae_mismatch: bool = False
    class_balanced: bool = False
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    shard_size: int | None = None
    keep_shards: bool = False
    eval_ref: str | os.PathLike | None = None
    inception: str | os.PathLike | None = None

    def validate(self) -> None:
        """Option checks that need no file: fail before anything is loaded."""

        def whole(name: str, value: Any, minimum: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigurationError(f"{name} must be {what}; got {value!r}")

        whole("--num-fid-samples", self.num_samples, 1, "a positive number of images")
        whole("--batch-size", self.batch_size, 1, "a positive number of images per process")
        if self.shard_size is not None:
            whole("--shard-size", self.shard_size, 1, "a positive number of images")
        # the sampler's own checks, in the options' names; fills in the mode's step count
        self.num_steps = self.sampler_settings(names=OPTION_NAMES).num_steps
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigurationError(f"--dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.class_balanced:
            from selfflow.base.classes import NUM_IMAGENET_CLASSES
            from selfflow.base.seeds import balanced_labels
            from selfflow.model.checkpoint import read_card

            # N/K of each of the model's K classes: K from the checkpoint's config (read, not
            # loaded); files without one are the released 1000-class layout
            config = read_card(self.checkpoint)[1]
            classes = config.num_classes if config is not None else NUM_IMAGENET_CLASSES
            balanced_labels(self.seed, self.num_samples, classes)  # raises with the reason
        self.eval_ref = _in_cache_if_bare(self.eval_ref)
        for name, value in (("--eval-ref", self.eval_ref), ("--inception", self.inception)):
            if value is not None and not Path(value).is_file():
                where = " (a directory)" if Path(value).is_dir() else ""
                raise ConfigurationError(
                    f"{name} {value}: no such file{where}"
                    + (_cache_hint(value) if name == "--eval-ref" else "")
                )
        if self.inception is not None and self.eval_ref is None:
            raise ConfigurationError("--inception is only used with --eval-ref")

    def sampler_settings(self, names: Mapping[str, str] | None = None) -> SamplerSettings:
        """The sampler's settings for this batch (checked; errors worded with ``names``)."""
        return SamplerSettings(
            self.num_steps,
            self.mode,
            self.solver,
            self.cfg_scale,
            (self.guidance_low, self.guidance_high),
            names=names,
        )


@dataclass
class BatchResult:
    """What a finished batch reports (on rank 0): the npz, counts, speed and metrics."""

    npz_path: Path
    num_samples: int
    new_samples: int
    seconds: float
    world_size: int
    metrics: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.new_samples == 0:
            return f"{self.num_samples} images already complete in {self.npz_path}"
        return (
            f"{self.num_samples} images ({self.new_samples} sampled now) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s on {self.world_size} "
            f"process{'es' if self.world_size > 1 else ''}; wrote {self.npz_path}"
        )


def batch_shape(num_samples: int, batch_size: int) -> int:
    """The one batch size every process samples with: ``--batch-size``, or N if smaller.

    It depends on the run's settings alone, never on a process's share of the work: kernels
    round differently per batch shape (bf16 and float32 alike), and at one shape a row's result
    does not depend on its neighbours, so one shape everywhere makes a sample's bytes the same
    on any GPU count, in a short last batch and in a resume that redoes a few shards. (The
    compiled fast path also compiles again, about a minute for XL/2, for every new shape.)
    """
    return max(1, min(batch_size, num_samples))


def pad_batch(indices: np.ndarray, size: int) -> np.ndarray:
    """``indices`` followed by copies of its last index, ``size`` in all.

    The noise of a sample is keyed by its index alone, so the padding rows are copies of the
    last sample and the real rows are what they would be in a batch of their own.
    """
    if len(indices) >= size:
        return indices
    return np.concatenate([indices, np.full(size - len(indices), indices[-1], indices.dtype)])


def _in_cache_if_bare(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """A bare file name that is not in the working folder, found in selfflow's cache instead.

    ``selfflow download reference`` puts ADM's reference batch there, so the official command
    line ``--eval-ref VIRTUAL_imagenet256_labeled.npz`` works from any folder.
    """
    if path is None or Path(path).exists() or Path(path).name != str(path):
        return path
    from selfflow.base.cache import cache_dir

    cached = cache_dir() / str(path)
    return str(cached) if cached.is_file() else path


def _cache_hint(path: str | os.PathLike) -> str:
    if Path(path).name != str(path):
        return ""
    from selfflow.base.cache import cache_dir

    return f", neither here nor in {cache_dir()} (`selfflow download reference` puts it there)"
