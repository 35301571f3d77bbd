"""What a run records of its data for its exports: the card (classes, VAE) and the VAE it decodes with.

The trainer asks once, at start (and in the dry run): the VAE is ``--vae`` or the one the
dataset records; the card (:mod:`selfflow.model.card`) goes into every checkpoint and export, so the
export samples its own classes with its own VAE.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from selfflow.model.card import ModelCard, check_vae_identity, chosen_vae

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
    ``--allow-vae-mismatch`` (then ``log`` says so). A recorded folder missing from this
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
    if given is not None and recorded is not None and check:
        from selfflow.model.vae import encoder_record_of

        note = check_vae_identity(
            recorded,
            encoder_record_of(name),
            name,
            allow=config.allow_vae_mismatch,
            what=f"the dataset {config.data}",
        )
        if note:
            log(note)
    return name, replace(card, vae=name)


def vae_plan_line(name: str, settings: Any) -> str:
    """The dry run's word on the VAE: where it loads from and what the run uses it for."""
    from selfflow.model.vae import vae_source

    uses = "the sample grids decode with it and the exports record it"
    if not settings.sample_every:
        uses = "the exports record it"
    return f"VAE: {vae_source(name)} ({uses})"
