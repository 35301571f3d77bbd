"""The latent convention: how a VAE's latents become the numbers a model is trained on, and back.

A diffusers ``AutoencoderKL`` encodes an image to ``z`` (``latent_channels`` × H/f × W/f, with
``f = 2 ** (len(block_out_channels) - 1)``); its config's ``scaling_factor`` and
``shift_factor`` say how ``z`` is brought to about unit variance, as diffusers' own pipelines
apply them::

    latents = (z - shift_factor) * scaling_factor          encoding (training data)
    z = latents / scaling_factor + shift_factor            decoding (before vae.decode)

Some latent spaces also need a per-channel normalisation (LightningDiT normalises its VA-VAE's
latents per channel before training); ``selfflow prepare --latent-norm channel`` measures the per-channel mean and
std of the scaled latents over the dataset, and the model then sees ``(latents - mean) / std``.
A VAE whose config itself carries ``latents_mean`` and ``latents_std`` (Playground v2.5's; the
SDXL pipeline applies them) is taken as diffusers' pipelines take it, without measuring::

    latents = (z - latents_mean) * scaling_factor / latents_std
    z = latents * latents_std / scaling_factor + latents_mean

which is this module's form with ``mean = (latents_mean - shift) · scale`` and
``std = latents_std`` (:func:`convention_of_vae`); ``--latent-norm channel`` replaces them
with the dataset's measured ones.

:class:`LatentConvention` holds all of it, and :meth:`~LatentConvention.normalise` and
:meth:`~LatentConvention.denormalise` are the one place where it is applied. The dataset
manifest and every model card record it (beside the VAE's identity), so a model always decodes
with the convention it was trained on; a VAE or model that does not fit is refused, naming both.
Files without a record (the released checkpoint, older manifests and cards) mean SD-VAE's
convention, :data:`SD_VAE`: 4 channels, factor 8, ``0.18215·z``, no shift, no statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from selfflow.base.errors import ConfigurationError

__all__ = ["SD_VAE", "SD_VAE_SCALE", "LatentConvention", "convention_of_vae"]

SD_VAE_SCALE = 0.18215  # SD-VAE's scaling_factor, which the released model was trained with
_FIELDS = ("channels", "factor", "scaling_factor", "shift_factor", "mean", "std")


@dataclass(frozen=True)
class LatentConvention:
    """A latent space as a model sees it (see the module docstring).

    ``channels`` and ``factor`` (pixels per latent along a side; ``None`` for data that no VAE
    made) describe the VAE's latents; ``scaling_factor`` and ``shift_factor`` are the VAE
    config's; ``mean`` and ``std`` (one per channel, or ``None``) the dataset's measured
    per-channel statistics of the scaled latents.
    """

    channels: int = 4
    factor: int | None = 8
    scaling_factor: float = SD_VAE_SCALE
    shift_factor: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise ValueError(f"latent channels must be an int; got {self.channels!r}")
        if self.channels < 1 or (self.factor is not None and self.factor < 1):
            raise ValueError(f"latent channels {self.channels} / factor {self.factor} must be >= 1")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be finite and > 0; got {self.scaling_factor}")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor must be finite; got {self.shift_factor}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("per-channel mean and std come together (both or neither)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(
                    f"per-channel statistics need {self.channels} values each; got "
                    f"{len(self.mean)} means and {len(self.std)} stds"
                )
            if not all(math.isfinite(s) and s > 0 for s in self.std):
                raise ValueError(f"per-channel stds must be finite and > 0; got {self.std}")
            if not all(math.isfinite(m) for m in self.mean):
                raise ValueError(f"per-channel means must be finite; got {self.mean}")

    # -- the arithmetic, in one place ---------------------------------------------------------

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents ``z`` (B, C, H, W) → what the model is trained on:
        ``((z − shift) · scale − mean) / std`` (a zero shift and absent statistics are skipped,
        so SD-VAE's is exactly ``z · 0.18215``)."""
        x = z - self.shift_factor if self.shift_factor else z
        x = x * self.scaling_factor
        if self.mean is not None and self.std is not None:
            x = (x - self._column(self.mean, x)) / self._column(self.std, x)
        return x

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalise`: a model's latents → the VAE's ``z`` for its decoder
        (SD-VAE's is exactly ``x / 0.18215``, the released sampler's arithmetic)."""
        if self.mean is not None and self.std is not None:
            x = x * self._column(self.std, x) + self._column(self.mean, x)
        z = x / self.scaling_factor
        return z + self.shift_factor if self.shift_factor else z

    @staticmethod
    def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    # -- records ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "factor": self.factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_dict(cls, values: object) -> LatentConvention:
        """A recorded convention; raises ValueError saying what is wrong with a damaged one."""
        if not isinstance(values, Mapping):
            raise ValueError(f"the latent convention is a {type(values).__name__}, expected a dict")
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise ValueError(f"the latent convention has unknown entries {unknown}")
        try:
            stats = {
                key: None if values.get(key) is None else tuple(float(v) for v in values[key])
                for key in ("mean", "std")
            }
            factor = values.get("factor", 8)
            return cls(
                channels=int(values.get("channels", 4)),
                factor=None if factor is None else int(factor),
                scaling_factor=float(values.get("scaling_factor", SD_VAE_SCALE)),
                shift_factor=float(values.get("shift_factor", 0.0)),
                **stats,
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"the latent convention is damaged: {error}") from error

    def with_statistics(self, mean: Sequence[float], std: Sequence[float]) -> LatentConvention:
        return replace(self, mean=tuple(map(float, mean)), std=tuple(map(float, std)))

    def describe(self) -> str:
        """One line a person compares by eye, e.g. ``16 channels, factor 8, (z − 0.0609) ·
        1.5305, per-channel mean/std``."""
        shift = f"(z − {self.shift_factor:g})" if self.shift_factor else "z"
        factor = f"factor {self.factor}" if self.factor is not None else "no VAE"
        stats = ", per-channel mean/std" if self.mean is not None else ""
        return f"{self.channels} channels, {factor}, {shift} · {self.scaling_factor:g}{stats}"

    # -- checks ------------------------------------------------------------------------------

    def check_vae(self, vae: Any, name: str, *, what: str = "the model") -> None:
        """Refuse a VAE whose latents are not this convention's (channels, scaling, shift),
        naming both: its decoder would turn the model's latents into noise. (The encoder's
        digest, :func:`selfflow.model.card.check_vae_identity`, tells VAEs of one convention
        apart; the downsampling factor is recorded for the image size, not compared.)"""
        found = convention_of_vae(vae)
        if not self.same_vae_space(found):
            raise ConfigurationError(
                f"the VAE {name} has latents of {found.describe()}, but {what} was trained on "
                f"{self.describe()}: pass the VAE it was trained with (--vae)"
            )

    def same_vae_space(self, other: LatentConvention) -> bool:
        """Same channels, scaling and shift (statistics aside: they are the data's, not the
        VAE's)."""
        return (
            self.channels == other.channels
            and math.isclose(self.scaling_factor, other.scaling_factor, rel_tol=1e-9)
            and math.isclose(self.shift_factor, other.shift_factor, rel_tol=1e-9, abs_tol=1e-12)
        )

    def check_image_size(self, size: int, patch: int = 2) -> None:
        """Refuse an image size (``prepare --image-size``) that this VAE cannot turn into
        latents the network can cut into ``patch`` × ``patch`` patches: said before hours of
        encoding, rather than by ``train`` afterwards."""
        factor = int(self.factor or 1)
        if size % factor:
            raise ConfigurationError(
                f"--image-size {size} is not a multiple of the VAE's downsampling factor "
                f"{factor}; choose a size that is (256, 512, ...)"
            )
        side = size // factor
        if side % patch or side < patch:
            raise ConfigurationError(
                f"--image-size {size} gives {side}×{side} latents with this VAE (downsampling "
                f"{factor}); Self-Flow's models cut latents into {patch}×{patch} patches, so "
                f"choose a multiple of {patch * factor}"
            )

    def check_channels(self, in_channels: int, what: str = "the model") -> None:
        """Refuse a model whose input channels are not the convention's."""
        if in_channels != self.channels:
            raise ConfigurationError(
                f"{what} takes {in_channels}-channel latents, but its latent convention is "
                f"{self.describe()}; the card or the checkpoint is damaged"
            )


SD_VAE = LatentConvention()


def convention_of_vae(vae: Any) -> LatentConvention:
    """The convention a diffusers ``AutoencoderKL`` defines through its config: latent channels,
    downsampling factor ``2 ** (len(block_out_channels) − 1)``, ``scaling_factor`` (diffusers'
    default 0.18215), ``shift_factor`` (``None`` in the config: no shift), and per-channel
    statistics when the config gives ``latents_mean`` and ``latents_std`` (see the module
    docstring for how diffusers applies them). A config whose entries do not fit is refused,
    naming them."""
    config = vae.config
    blocks = getattr(config, "block_out_channels", None) or (0,) * 4
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    raw_mean = getattr(config, "latents_mean", None)
    raw_std = getattr(config, "latents_std", None)
    try:
        convention = LatentConvention(
            channels=int(getattr(config, "latent_channels", 4)),
            factor=2 ** (len(blocks) - 1),
            scaling_factor=SD_VAE_SCALE if scale is None else float(scale),
            shift_factor=0.0 if shift is None else float(shift),
        )
        if raw_mean is None and raw_std is None:
            return convention
        if raw_mean is None or raw_std is None:
            raise ValueError("latents_mean and latents_std come together (both or neither)")
        s, shift_ = convention.scaling_factor, convention.shift_factor
        return convention.with_statistics([(float(m) - shift_) * s for m in raw_mean], raw_std)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"the VAE's config does not define a latent space: {error}"
        ) from error
