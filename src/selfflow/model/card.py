"""What a model was trained on: its class names, the VAE its latents came from, and their
convention (:mod:`selfflow.model.latents`: channels, downsampling, scaling, shift, statistics).

A model carries its world (DESIGN.md): a model trained on a user's three folders must sample
labels 0–2, caption them "boat", "car", "tree", and decode with the VAE that encoded its data,
without being told. The :class:`ModelCard` is that record. The trainer writes it into every
training checkpoint and every export (the ``"card"`` entry of a ``.pt``, the ``selfflow_card``
metadata of a ``.safetensors``); :func:`selfflow.model.checkpoint.load_model` reads it back as
``model.checkpoint_info.card``. A file without one (the released checkpoint, exports of
earlier versions) gets :data:`RELEASED`: ImageNet's classes and SD-VAE.

The VAE is recorded as the dataset manifest records it: where it was loaded from (a hub id, or
a local folder as an absolute path, so a run started from another folder still finds it) and
the sha256 of its encoder's weights (:func:`selfflow.model.vae.encoder_identity`), the part that
made the latents. A VAE given by hand is checked against that digest; a different encoder
would decode the model's latents into the wrong images, so it is refused unless the user
insists (``--allow-vae-mismatch``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfflow.base.classes import NUM_IMAGENET_CLASSES, ImageNetClass, classes_from_names
from selfflow.base.errors import ConfigurationError
from selfflow.model.latents import SD_VAE, LatentConvention

SD_VAE_ID = (
    "stabilityai/sd-vae-ft-ema"  # the released model's VAE; selfflow.model.vae re-exports it
)
MISMATCH_FLAG = "--allow-vae-mismatch"


@dataclass(frozen=True)
class ModelCard:
    """A model's label space names and latent space origin (see the module docstring).

    ``class_names``: one per label, in label order (``None``: ImageNet's 1000). ``vae``: a hub
    id or an absolute local folder (``None``: the latents were not made by a VAE, e.g. data
    written with :func:`selfflow.data.write_dataset`). ``vae_identity``: ``encoder-sha256:…``
    (``None``: not known, as for the released checkpoint). ``dataset``: the identity of the
    dataset it was trained on, when it was trained here. ``latent``: the latent convention
    (:class:`~selfflow.model.latents.LatentConvention`; ``None``: SD-VAE's, see :attr:`convention`).
    ``ema_length``: the σ_rel of a post-hoc EMA export (``selfflow export --ema-length``);
    ``None`` for every other file, whose card then reads and writes as before the entry existed.
    """

    class_names: tuple[str, ...] | None = None
    vae: str | None = SD_VAE_ID
    vae_identity: str | None = None
    dataset: str | None = None
    latent: LatentConvention | None = None

    @property
    def convention(self) -> LatentConvention:
        """The latent convention the model was trained on; a card without one (the released
        model, cards of earlier versions) means SD-VAE's (:data:`~selfflow.model.latents.SD_VAE`)."""
        return self.latent if self.latent is not None else SD_VAE

    ema_length: float | None = None

    def classes(self, num_classes: int) -> tuple[ImageNetClass, ...]:
        """The model's ``num_classes`` classes (the null label is not one of them).

        A model whose label space was widened beyond its data (``train --num-classes``) names
        the extra labels ``class K`` …; a card without names is ImageNet's for a 1000-class
        model and ``class 0`` … otherwise.
        """
        if self.class_names is None and num_classes == NUM_IMAGENET_CLASSES:
            return classes_from_names(None)
        names = list(self.class_names or [])[:num_classes]
        names += [f"class {i}" for i in range(len(names), num_classes)]
        return classes_from_names(names)

    def to_dict(self) -> dict[str, Any]:
        values = {
            "class_names": None if self.class_names is None else list(self.class_names),
            "vae": self.vae,
            "vae_identity": self.vae_identity,
            "dataset": self.dataset,
            **({} if self.latent is None else {"latent": self.latent.to_dict()}),
        }
        if self.ema_length is not None:  # only post-hoc EMA exports carry it
            values["ema_length"] = self.ema_length
        return values

    @classmethod
    def from_dict(cls, values: object) -> ModelCard:
        """The card of a file; raises ValueError saying what is wrong with a damaged one."""
        if not isinstance(values, Mapping):
            raise ValueError(f"the model card is a {type(values).__name__}, expected a dict")
        known = {"class_names", "vae", "vae_identity", "dataset", "latent", "ema_length"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"the model card has unknown entries {unknown}")
        names = values.get("class_names")
        if names is not None and (
            not isinstance(names, Sequence)
            or isinstance(names, str)
            or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError("the model card's class_names is not a list of strings")
        for key in ("vae", "vae_identity", "dataset"):
            if values.get(key) is not None and not isinstance(values.get(key), str):
                raise ValueError(f"the model card's {key} is not a string")
        length = values.get("ema_length")
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, (int, float))
        ):
            raise ValueError("the model card's ema_length is not a number")
        return cls(
            class_names=None if names is None else tuple(names),
            vae=values.get("vae", SD_VAE_ID),
            vae_identity=values.get("vae_identity"),
            dataset=values.get("dataset"),
            latent=None
            if values.get("latent") is None
            else LatentConvention.from_dict(values["latent"]),
            ema_length=None if length is None else float(length),
        )


RELEASED = ModelCard()


def resolved_vae_name(name: str | os.PathLike) -> str:
    """What to record for a VAE given as ``name``: a local folder as its absolute path (a
    relative one would point elsewhere from another working folder), a hub id as given."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else str(name)


def chosen_vae(card: ModelCard, given: str | os.PathLike | None) -> str:
    """The VAE to decode a model's latents with: ``given`` (``--vae``) or the card's own.

    Refused, saying what to do, when the card names none (latents not made by a VAE) or names
    a local folder that is not on this machine (rather than asking the hub for a path).
    """
    if given is not None:
        return resolved_vae_name(given)
    if card.vae is None:
        raise ConfigurationError(
            "this model was trained on latents that no VAE made (its card records none), so "
            "it has no decoder of its own: pass --vae ID_OR_DIR to decode its samples"
        )
    if Path(card.vae).is_absolute() and not Path(card.vae).exists():
        raise ConfigurationError(
            f"this model's latents came from the VAE folder {card.vae}, which is not on this "
            f"machine: pass --vae ID_OR_DIR with a copy of it"
            + (f" (its encoder digest is {short(card.vae_identity)})" if card.vae_identity else "")
        )
    return card.vae


def check_vae_identity(
    recorded: str | None, found: str, name: str, *, allow: bool, what: str = "the model"
) -> str | None:
    """Compare a VAE's encoder digest ``found`` with the ``recorded`` one.

    Returns ``None`` when they agree (or nothing was recorded), a warning when they differ and
    ``allow`` is set; otherwise refuses, naming both, since another encoder's latent space
    decodes into other images.
    """
    if recorded is None or recorded == found:
        return None
    message = (
        f"the VAE {name} has the encoder {short(found)}, but {what} was trained on latents of "
        f"the encoder {short(recorded)}"
    )
    if allow:
        return f"warning: {message}; decoding with it anyway ({MISMATCH_FLAG})"
    raise ConfigurationError(
        f"{message}: its latents would decode into other images. Pass the VAE the data was "
        f"prepared with, or {MISMATCH_FLAG} to use this one anyway"
    )


def short(identity: str | None) -> str:
    """``encoder-sha256:0123456789ab…`` cut to what a person compares by eye."""
    if identity is None:
        return "(unknown)"
    kind, _, digest = identity.rpartition(":")
    return f"{kind + ':' if kind else ''}{digest[:12]}…"
