"""What a run records of its data for its exports: the card (classes, VAE) and the VAE it decodes with.

The trainer asks once, at start (and in the dry run): the VAE is ``--vae`` or the one the
dataset records; the card (:mod:`selfflow.model.card`) goes into every checkpoint and export, so the
export samples its own classes with its own VAE.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from selfflow.base.errors import ConfigurationError
from selfflow.model.card import MISMATCH_FLAG, ModelCard, check_vae_identity, chosen_vae

if TYPE_CHECKING:
    from collections.abc import Callable

    from selfflow.data import LatentDataset
    from selfflow.train.config import TrainConfig


def run_card(
    dataset: LatentDataset,
    config: TrainConfig,
    settings: Any,
    *,
    check: bool,
    log: Callable[[str], None],
) -> tuple[str | None, ModelCard]:
    """The VAE that decodes this run's pictures, and the card its exports carry.

    A ``--vae`` must have the encoder that made the data's latents: with ``check`` (the process
    that reports) it is loaded once in float32 to compare; a mismatch is refused unless
    ``--allow-vae-mismatch`` (then ``log`` says so). A VAE of another latent space is refused
    whatever the flag (:func:`check_vae_space`). A recorded folder missing from this
    machine is refused only when the run decodes (grids, evaluations), recorded as it is
    otherwise. ``settings`` are the resolved settings (``sample_every``, ``eval_every``).
    """
    recorded = dataset.manifest.get("vae_identity")
    card = ModelCard(
        class_names=tuple(dataset.class_names),
        vae=dataset.vae,
        vae_identity=recorded,
        dataset=dataset.identity,
        latent=dataset.latent,  # the latent convention: decoding undoes exactly this
    )
    given = config.vae
    decodes = bool(settings.sample_every or settings.eval_every)
    if given is None and (dataset.vae is None or not decodes):
        return dataset.vae, card
    name = chosen_vae(card, given)
    checks = recorded is not None or dataset.latent.factor is not None  # raw data: nothing
    if given is not None and check and checks:
        import torch

        from selfflow.model.vae import encoder_record, load_vae

        vae = load_vae(name, dtype=torch.float32)  # float32: the encoder digest's precision
        check_vae_space(dataset, vae, name, config.data)
        note = check_vae_identity(
            recorded,
            encoder_record(vae),
            name,
            allow=config.allow_vae_mismatch,
            what=f"the dataset {config.data}",
        )
        if note:
            log(note)
    return name, replace(card, vae=name)


def check_vae_space(dataset: LatentDataset, vae: Any, name: str, data: str) -> None:
    """Refuse a ``--vae`` whose latent space (channels, scaling, shift) is not the data's,
    naming both, whatever ``--allow-vae-mismatch`` says: that flag lets another *encoder* of
    the same space decode, but a VAE of another space cannot decode the model's latents at all,
    and the run would die at its first sample grid, hours in, with its exports recording it.
    Latents that no VAE made (no downsampling factor) take any VAE, as the sampler does."""
    from selfflow.model.latents import convention_of_vae

    if dataset.latent.factor is None:
        return
    found = convention_of_vae(vae)
    if not dataset.latent.same_vae_space(found):
        raise ConfigurationError(
            f"--vae {name} has latents of {found.describe()}, but the dataset {data} holds "
            f"latents of {dataset.latent.describe()}: its decoder cannot read them "
            f"({MISMATCH_FLAG} allows only another encoder of the same latent space); pass the "
            f"VAE the data was prepared with ({dataset.vae})"
        )


def vae_plan_line(name: str, settings: Any) -> str:
    """The dry run's word on the VAE: where it loads from and what the run uses it for."""
    from selfflow.model.vae import vae_source

    uses = "the sample grids decode with it and the exports record it"
    if not settings.sample_every:
        uses = "the exports record it"
    return f"VAE: {vae_source(name)} ({uses})"
