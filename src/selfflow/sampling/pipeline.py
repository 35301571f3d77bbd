"""The Python API: model + sampler + VAE → uint8 images for a list of sample indices.

``SelfFlowPipeline.from_pretrained()`` loads the released checkpoint and the SD-VAE;
``pipe(class_labels, seed=...)`` returns ``(B, 256, 256, 3)`` uint8 images (a model trained
here: at its own resolution, decoded with its card's VAE and latent convention). Sample ``i`` of a
call (its global index is ``indices[i]``, by default ``i``) takes its start noise and every
Brownian increment from streams keyed by ``(seed, index)``: the same index gives the same
random numbers whatever batch it is drawn in.

Bytes: kernels (bf16 and float32 alike, CPU and GPU) are chosen per batch shape and round
differently per shape, but at one shape a row's result does not depend on the other rows. So
with ``batch_size=B`` every network call sees B rows (a short last batch is padded with copies
of its last sample) and every VAE decode sees ``selfflow.model.vae.DECODE_BATCH`` latents: an
image's bytes are then the same whichever call, batch or position it is drawn in. Another B
rounds differently: the same noise and labels, so the same distribution, but other bytes
(docs/sampling.md's "What is byte-identical" gives the measured sizes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from selfflow.base import seeds
from selfflow.base.distributed import resolve_device, resolve_dtype
from selfflow.base.errors import ConfigurationError
from selfflow.base.finite import NonFiniteSamplesError
from selfflow.model import vae
from selfflow.model.card import RELEASED
from selfflow.model.latents import SD_VAE, LatentConvention, convention_of_vae
from selfflow.model.network import SelfFlowDiT
from selfflow.sampling import transport
from selfflow.sampling.settings import (
    DEFAULT_CFG_SCALE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_MODE,
    DEFAULT_SOLVER,
    SamplerSettings,
)
from selfflow.sampling.transport import ModelFn


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return resolve_device(None)


def network_for(
    model: SelfFlowDiT,
    dtype: torch.dtype,
    compile: bool | None = None,
    device: torch.device | None = None,
) -> ModelFn:
    """The callable that runs ``model`` in ``dtype`` on ``device`` (default: the model's).

    float32 is the model itself (the plain reference path); bfloat16/float16 is the fast path
    (:class:`selfflow.model.inference.FastSelfFlow`, tested against the reference).
    """
    if dtype == torch.float32:
        return model if device is None else model.to(device)
    from selfflow.model.inference import FastSelfFlow

    return FastSelfFlow.from_model(model, dtype=dtype, compile=compile, device=device)


def check_labels(
    class_labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int = 1000
) -> torch.Tensor:
    """Labels as int64; each in ``[0, num_classes]`` (``num_classes`` is the null label)."""
    labels = torch.as_tensor(np.asarray(class_labels))
    if labels.dim() != 1 or labels.numel() == 0:
        raise ConfigurationError(
            f"class_labels must be a non-empty 1-D list; got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigurationError(f"class_labels must be integers; got {labels.dtype}")
    bad = labels[(labels < 0) | (labels > num_classes)]
    if bad.numel():
        raise ConfigurationError(
            f"class labels must lie in [0, {num_classes}] ({num_classes} = unconditional); got {bad.tolist()[:8]}"
        )
    return labels.to(torch.int64)


class SelfFlowPipeline:
    """Sample Self-Flow images.

    ``model_fn`` defaults to the model itself; the fast path (``selfflow.model.inference``) can be passed
    instead, as any callable ``(x, tau, y) -> ε − x_data`` with the model's signature.
    """

    def __init__(
        self,
        model: SelfFlowDiT,
        autoencoder=None,
        *,
        device: str | torch.device | None = None,
        model_fn: ModelFn | None = None,
        latent: LatentConvention | None = None,
        vae_name: str | None = None,
    ) -> None:
        self.model = model
        self.autoencoder = autoencoder
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.model_fn = model_fn or model
        self.vae_name = vae_name  # where the VAE came from, when from_pretrained loaded it
        self.latent_shape = (
            model.config.in_channels,
            model.config.input_size,
            model.config.input_size,
        )
        self.latent = self._decoding_convention(latent)

    def _decoding_convention(self, given: LatentConvention | None) -> LatentConvention:
        """How this pipeline's latents are decoded: ``given``, else the model card's convention
        (SD-VAE's for the released model). A VAE whose latents are of another convention is
        refused, naming both; for latents that no VAE made (a card without a downsampling
        factor), the VAE given to decode them brings its own."""
        info = getattr(self.model, "checkpoint_info", None)
        explicit = given if given is not None else info.card.latent if info is not None else None
        convention = explicit if explicit is not None else SD_VAE
        if explicit is not None:
            convention.check_channels(self.model.config.in_channels)
        if self.autoencoder is None:
            return convention
        if convention.factor is None:
            return convention_of_vae(self.autoencoder)
        convention.check_vae(self.autoencoder, self.vae_name or "given")
        return convention

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype = torch.bfloat16,
        compile: bool | None = None,
        allow_vae_mismatch: bool = False,
    ) -> SelfFlowPipeline:
        """Load the model (``checkpoint=None``: the released file) and its VAE.

        ``vae=None`` decodes with the VAE the model's card records (SD-VAE for the released
        model, the data's own VAE for a model trained here); a ``vae`` given by hand must have
        the encoder the model was trained on, unless ``allow_vae_mismatch`` (then a warning is
        logged). ``dtype`` picks the network: ``float32`` runs the plain reference model;
        ``bfloat16`` (the default on CUDA) runs the fast path of :mod:`selfflow.model.inference` (bf16
        matmuls, float32 residual stream, compiled on CUDA unless ``compile=False``).
        The VAE used is ``pipe.vae_name``; the model's classes are ``pipe.classes``.
        """
        from selfflow.model.card import check_vae_identity, chosen_vae
        from selfflow.model.checkpoint import load_model
        from selfflow.model.vae import encoder_record_of, load_vae

        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        # The fast path copies the weights to the device itself; the float32 model it reads
        # from then stays on the CPU (2.7 GB less GPU memory for XL/2).
        model_device = device if dtype == torch.float32 else torch.device("cpu")
        model = load_model(checkpoint, device=model_device, dtype=torch.float32)
        card = model.checkpoint_info.card
        vae_name = chosen_vae(card, vae)
        autoencoder = load_vae(vae_name, device=device, dtype=vae_dtype)
        if vae is not None and card.convention.factor is not None:
            # another latent space first: no flag allows it, so --allow-vae-mismatch is no help
            card.convention.check_vae(autoencoder, vae_name)
        if vae is not None and card.vae_identity is not None:
            note = check_vae_identity(
                card.vae_identity, encoder_record_of(vae_name), vae_name, allow=allow_vae_mismatch
            )
            if note:
                warnings.warn(note, stacklevel=2)
        model_fn = network_for(model, dtype, compile, device=device)
        return cls(model, autoencoder, device=device, model_fn=model_fn, vae_name=vae_name)

    @property
    def classes(self):
        """The model's classes (label, WordNet id, name), from its card (ImageNet's when the
        model records none)."""
        info = getattr(self.model, "checkpoint_info", None)
        card = info.card if info is not None else RELEASED
        return card.classes(self.model.config.num_classes)

    # -- the three stages ---------------------------------------------------------------------

    def velocity_fn(self, labels: torch.Tensor, settings: SamplerSettings) -> transport.Velocity:
        """Paper-convention velocity of the model for ``labels``, guided as ``settings`` says.

        The sampler integrates in float32; the network takes x in its own dtype but tau in
        float32 (a bf16 tau would round the time to steps of 1/256, about one grid step at 250
        steps; the timestep embedding computes its features in float32).
        """
        dtype = next(self.model.parameters()).dtype
        model_fn = self.model_fn

        def network(x: torch.Tensor, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model_fn(x.to(dtype), tau.float(), y).float()

        return transport.guided_velocity(
            network,
            labels.to(self.device),
            cfg_scale=settings.cfg_scale,
            guidance_interval=settings.guidance_interval,
            null_label=self.model.config.null_class,
        )

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        indices: Sequence[int],
        seed: int,
        settings: SamplerSettings,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from each sample's keyed start noise to a clean latent (float32).

        A sample that goes NaN or inf raises :class:`~selfflow.base.finite.NonFiniteSamplesError`
        naming its entry of ``indices``.
        """
        x = seeds.start_noise(seed, indices, self.latent_shape).to(self.device)
        brownian = None
        if settings.mode == "sde":
            brownian = seeds.BrownianIncrements(seed, indices, self.latent_shape, self.device)
        try:
            return transport.sample(
                self.velocity_fn(labels, settings),
                x,
                mode=settings.mode,
                num_steps=settings.num_steps,
                solver=settings.solver,
                brownian=brownian,
                progress=progress,
            )
        except NonFiniteSamplesError as error:
            raise error.renamed(indices) from None

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 images of ``latents``, decoded ``vae.DECODE_BATCH`` at a time (one shape)."""
        if self.autoencoder is None:
            raise ConfigurationError(
                "this pipeline has no VAE: pass one to decode latents into images"
            )
        return vae.decode(self.autoencoder, latents, convention=self.latent)

    def __call__(
        self,
        class_labels: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        seed: int = 0,
        num_steps: int | None = None,
        mode: str = DEFAULT_MODE,
        solver: str = DEFAULT_SOLVER,
        cfg_scale: float = DEFAULT_CFG_SCALE,
        guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Generate uint8 images ``(B, H, W, 3)`` for ``class_labels`` (1000 = unconditional).

        ``indices`` are the samples' global indices (default ``0..B−1``): they key the noise.
        ``num_steps=None`` is the mode's default (SDE 250, ODE 50). ``batch_size``: the network
        sees exactly this many rows per call (default: all labels in one call); an image's
        bytes depend on it, not on the other labels of the call or on its position.
        """
        labels = check_labels(class_labels, self.model.config.num_classes)
        if indices is None:
            indices = range(len(labels))
        indices = [int(i) for i in indices]
        if len(indices) != len(labels):
            raise ConfigurationError(f"got {len(labels)} labels but {len(indices)} indices")
        size = len(labels) if batch_size is None else int(batch_size)
        if size < 1:
            raise ConfigurationError(f"batch_size must be at least 1; got {batch_size}")
        settings = SamplerSettings(num_steps, mode, solver, cfg_scale, tuple(guidance_interval))
        latents = []
        for start in range(0, len(labels), size):
            real = min(size, len(labels) - start)
            rows = list(range(start, start + real)) + [start + real - 1] * (size - real)
            batch = self.sample_latents(
                labels[rows], [indices[r] for r in rows], seed, settings, progress=progress
            )[:real]
            latents.append(batch)
        try:
            return self.decode(torch.cat(latents))
        except NonFiniteSamplesError as error:
            raise error.renamed(indices) from None
