"""Validation loss at fixed noise: is the network getting better at each noise level?

The training loss mixes every noise level, every random mask and every batch's images, so its
curve is noisy and says little once it flattens. The Self-Flow authors point users who ask
"is it working?" to the *stratified* diffusion loss (official issue #4): the loss at fixed
noise levels, on fixed data, with fixed noise. ``selfflow train --val-data DIR --val-every K``
computes, every K steps (and at step 0 of a new run), on held-out latents
(``selfflow prepare --val-per-class N`` makes them; any dataset of the same latent shape and
classes will do):

- the **flow loss** at each ``τ`` of :data:`VAL_TAUS` (every token at that ``τ``, the true
  label), for the online model and for the EMA;
- the **representation cosine** ``cos(projector(h_student), h_teacher)`` at the same points
  (runs with a representation loss only): the online model's projected block against the EMA's
  block, the pairing the objective trains, and the EMA's own projected block against the same
  target.

Both come from the objective's own function, :func:`selfflow.train.objective.self_flow_loss`
(with ``tau = tau_teacher = τ``; ``cos = 1 − rep``), so validation measures what training
optimises. The data are fixed: row ``i`` of the validation dataset gets its posterior draw and
its path noise ``ε`` from the streams ``validation/posterior`` and ``validation/noise`` keyed by
``(VAL_SEED, i)`` (:func:`selfflow.base.seeds.keyed_rng`), the same ``ε`` at every ``τ`` and
the same for every run, seed and method, so curves of different runs compare point for point.

**Any process count gives the same numbers.** The rows are cut into chunks of
:data:`CHUNK` rows (fixed, whatever the process count); each process evaluates whole chunks,
and rank 0 combines the chunk means in chunk order. Under FSDP every process runs the same
number of forwards (a process without a chunk left repeats chunk 0, whose result it drops),
because a sharded forward is a collective.

**Cost.** Per validation, for each row and each ``τ``: one forward of the online model and
one of the EMA, plus (with a representation loss) their projectors and one EMA forward up to
the teacher block, whose features serve both cosines: :func:`validation_flops`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.seeds import keyed_rng, normals
from selfflow.model.latents import LatentConvention
from selfflow.train.objective import self_flow_loss

if TYPE_CHECKING:
    from selfflow.data import LatentDataset
    from selfflow.model.network import ModelConfig
    from selfflow.train.config import ResolvedConfig

VAL_TAUS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Paper times (``τ = 1`` noise) of the validation grid."""
VAL_SEED = 0
"""The validation draws' seed: one for every run, so that runs compare on the same noise."""
CHUNK = 32
"""Rows per forward; the unit of work a process takes (fixed, so the sums never depend on the
process count)."""
MODELS = ("online", "ema")


def open_val_data(settings: Any, train_data: LatentDataset) -> LatentDataset:
    """The ``--val-data`` dataset, refused unless its latents and classes are the training
    data's (each difference named), before any training work."""
    from selfflow.base.errors import DatasetError
    from selfflow.data import LatentDataset

    try:
        val = LatentDataset(settings.val_data)
    except DatasetError as error:  # say which option named the folder
        raise DatasetError(f"--val-data {settings.val_data}: {error}") from None
    if len(val) == 0:
        raise ConfigurationError(f"--val-data {settings.val_data} holds no images")
    trained_on = _not_held_out(val, train_data)
    if trained_on:
        raise ConfigurationError(
            f"--val-data {settings.val_data} is not held out from --data {settings.data}: "
            f"{trained_on}"
        )
    found = []
    for name in ("latent_shape", "has_std", "scale"):
        mine, theirs = getattr(val, name), getattr(train_data, name)
        if mine != theirs:
            found.append(f"{name} {mine} (training data: {theirs})")
    if val.class_names != train_data.class_names:
        first = next(
            (
                i
                for i, (a, b) in enumerate(
                    zip(val.class_names, train_data.class_names, strict=False)
                )
                if a != b
            ),
            min(len(val.class_names), len(train_data.class_names)),
        )
        found.append(
            f"classes: {len(val.class_names)}, class {first} "
            f"{_name_at(val.class_names, first)} (training data: {len(train_data.class_names)}, "
            f"class {first} {_name_at(train_data.class_names, first)})"
        )
    unscaled = [replace(d.latent, mean=None, std=None) for d in (val, train_data)]
    if unscaled[0] != unscaled[1]:  # the statistics may differ: the training data's are used
        found.append(f"latents {unscaled[0].describe()} (training data: {unscaled[1].describe()})")
    mine, theirs = val.manifest.get("vae_identity"), train_data.manifest.get("vae_identity")
    if mine != theirs:
        found.append(f"VAE encoder {val.vae} (training data: {train_data.vae})")
    if found:
        raise ConfigurationError(
            f"--val-data {settings.val_data} is not held-out data of {settings.data}: "
            + "; ".join(found)
        )
    return val


def _not_held_out(val: LatentDataset, train_data: LatentDataset) -> str | None:
    """What shows that the validation data were trained on, and what to pass instead; None if
    nothing does. Found: the same dataset, or the halves of a ``prepare --val-per-class`` split
    used the wrong way round (each manifest's ``holdout`` record names its part and both
    folders). Data without a record (``write_dataset``, a split prepared alone) cannot be told
    apart and are accepted."""
    records = [d.manifest.get("holdout") for d in (val, train_data)]
    records = [r if isinstance(r, dict) else {} for r in records]
    found = []
    same = val.identity == train_data.identity
    if same:
        found.append(f"it is the training data itself (identity {val.identity})")
    for label, dataset, record, wrong in (
        ("--val-data", val, records[0], "train"),
        ("--data", train_data, records[1], "val"),
    ):
        if record.get("part") == wrong and not same:
            found.append(
                f"{label} {dataset.root} is the {'training' if wrong == 'train' else 'held-out'} "
                f"part of a --val-per-class split (its manifest's holdout part is {wrong!r})"
            )
    if not found:
        return None
    split = next((r for r in records if r.get("train") and r.get("val")), None)
    hint = (
        f"pass its held-out part: --data {split['train']} --val-data {split['val']}"
        if split
        else "pass held-out data (`selfflow prepare --val-per-class N` writes them to OUT_DIR-val)"
    )
    return "; ".join(found) + "; " + hint


def _name_at(names: list[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "(none)"


def validation_rows(size: int, samples: int) -> np.ndarray:
    """``samples`` row indices spread evenly over a dataset of ``size`` rows (all if fewer): a
    prepared dataset runs class by class, so its first rows would be its first classes."""
    n = min(size, samples)
    return np.asarray([(i * size) // n for i in range(n)], dtype=np.int64)


def row_inputs(
    dataset: LatentDataset, rows: np.ndarray, latent: LatentConvention | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0, y, noise)`` of validation rows: ``x0 = scale·(mean + std·n)`` with ``n`` and the
    path noise from the rows' own keyed streams (float32, CPU), brought to the model's latents
    by ``latent`` (the training data's convention: a held-out set prepared with
    ``--latent-norm channel`` measured statistics of its own, but the model learnt the
    training data's; default: the dataset's own)."""
    means, stds, labels = dataset.get_batch(rows)
    shape = tuple(dataset.latent_shape)
    x0 = means
    if stds is not None:
        draws = [normals(keyed_rng(VAL_SEED, int(i), "validation/posterior"), shape) for i in rows]
        x0 = means + stds * torch.stack(draws)
    noise = torch.stack(
        [normals(keyed_rng(VAL_SEED, int(i), "validation/noise"), shape) for i in rows]
    )
    return (latent or dataset.latent).normalise(x0), labels.to(torch.int64), noise


@dataclass(frozen=True)
class ValidationRecipe:
    """What a validation needs of the run's resolved settings."""

    rep_weight: float
    student_layer: int
    teacher_layer: int
    samples: int

    @classmethod
    def of(cls, resolved: ResolvedConfig) -> ValidationRecipe:
        s = resolved.settings
        return cls(s.rep_weight, s.student_layer, s.teacher_layer, s.val_samples)


def chunk_values(
    model: nn.Module,
    ema: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    recipe: ValidationRecipe,
) -> torch.Tensor:
    """``(models, taus, 2)`` float64: the chunk's mean flow loss and mean ``1 − cos`` (0 without
    a representation loss) of the online model and the EMA at each ``τ``, through the
    objective's own function."""
    out = torch.zeros(len(MODELS), len(VAL_TAUS), 2, dtype=torch.float64)
    rep = recipe.rep_weight > 0
    for k, tau_value in enumerate(VAL_TAUS):
        tau = torch.full((x0.shape[0],), tau_value, dtype=torch.float32, device=x0.device)
        teacher = _Reused(ema) if rep else None  # one teacher forward serves both models
        for m, student in enumerate((model, ema)):
            _, parts = self_flow_loss(
                student,
                teacher,
                x0,
                y,
                noise=noise,
                tau=tau,
                tau_teacher=tau,
                rep_weight=1.0 if rep else 0.0,
                student_layer=recipe.student_layer,
                teacher_layer=recipe.teacher_layer,
            )
            out[m, k, 0] = float(parts["flow"])
            out[m, k, 1] = float(parts["rep"])
    return out


class _Reused(nn.Module):
    """The EMA's teacher features, computed at the first call and returned again: at one
    ``τ`` both models' passes ask for the same features (same ``x0``, ``ε``, ``τ`` and labels)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.value: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.value is None:
            self.value = self.net(*args, **kwargs)
        return self.value


class Validation:
    """The validation of one run: :meth:`__call__` on every process returns the record's
    values on rank 0 (None elsewhere)."""

    def __init__(
        self,
        resolved: ResolvedConfig,
        dataset: LatentDataset,
        context: distributed.DistributedContext,
        *,
        autocast: torch.dtype | None = None,
        sharded: bool = False,
        latent: LatentConvention | None = None,
    ) -> None:
        self.recipe = ValidationRecipe.of(resolved)
        self.dataset, self.context, self.latent = dataset, context, latent
        self.autocast, self.sharded = autocast, sharded
        rows = validation_rows(len(dataset), self.recipe.samples)
        self.chunks = [rows[k : k + CHUNK] for k in range(0, len(rows), CHUNK)]

    def _mine(self) -> list[int]:
        """This process's chunk numbers; -1 (run chunk 0, drop the result) pads a sharded run
        so that every process makes the same forwards."""
        world, rank = self.context.world_size, self.context.rank
        rounds = -(-len(self.chunks) // world)
        mine = [j * world + rank for j in range(rounds)]
        return [
            c if c < len(self.chunks) else -1 for c in mine if c < len(self.chunks) or self.sharded
        ]

    @torch.no_grad()
    def __call__(self, model: nn.Module, ema: nn.Module) -> dict[str, float] | None:
        began = time.perf_counter()
        device = self.context.device
        results = []
        for c in self._mine():
            x0, y, noise = row_inputs(self.dataset, self.chunks[max(c, 0)], self.latent)
            with self._precision(device):
                values = chunk_values(
                    model, ema, x0.to(device), y.to(device), noise.to(device), self.recipe
                )
            if c >= 0:
                results.append((c, len(self.chunks[c]), values.tolist()))
        gathered = distributed.all_gather_objects(self.context, results)
        if not self.context.is_main:
            return None
        found = sorted(item for part in gathered for item in part)
        total = torch.zeros(len(MODELS), len(VAL_TAUS), 2, dtype=torch.float64)
        for _, count, values in found:  # chunk order: the same sums on any process count
            total += torch.tensor(values, dtype=torch.float64) * count
        rows = sum(count for _, count, _ in found)
        record = summarise(total / rows, self.recipe.rep_weight > 0)
        record["rows"] = rows
        record["seconds"] = time.perf_counter() - began
        return record

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def summarise(means: torch.Tensor, with_rep: bool) -> dict[str, float]:
    """The record's values from the ``(models, taus, 2)`` means: ``loss_tau0.5/online``,
    ``cos_tau0.5/ema`` (``1 − mean(1 − cos)``), and their means over the grid."""
    record: dict[str, float] = {}
    for m, name in enumerate(MODELS):
        for k, tau in enumerate(VAL_TAUS):
            record[f"loss_tau{tau}/{name}"] = float(means[m, k, 0])
            if with_rep:
                record[f"cos_tau{tau}/{name}"] = float(1.0 - means[m, k, 1])
        record[f"loss_mean/{name}"] = float(means[m, :, 0].mean())
        if with_rep:
            record[f"cos_mean/{name}"] = float(1.0 - means[m, :, 1].mean())
    return record


def validation_flops(config: ModelConfig, rows: int, *, rep: bool, teacher_layer: int) -> float:
    """Floating-point operations of one validation (multiply-add = 2, as the repo's counts):
    per row and ``τ``, a forward of the online model and of the EMA
    (:func:`selfflow.model.inference.forward_flops`) and, with a representation loss, their two
    projectors and one teacher forward to ``teacher_layer`` (shared by both)."""
    import dataclasses

    from selfflow.model.inference import forward_flops

    forward = forward_flops(config)
    per_point = 2 * forward
    if rep:
        d, p, t = config.hidden_size, config.projector_dim, config.num_tokens
        teacher = forward_flops(dataclasses.replace(config, depth=teacher_layer))
        per_point += 2 * (2 * t * (d * p + p * d)) + teacher
    return float(rows * len(VAL_TAUS) * per_point)
