"""Every training setting in one place: its default, its validation, and whether a resume may
change it.

:class:`TrainConfig` holds what the user asked for (``None`` where the default depends on
something else: the model size, the method, the dataset). :meth:`TrainConfig.resolve` turns it,
with the dataset's shape and class count, into a :class:`ResolvedConfig` in which every value
is concrete; that is what the trainer uses and what a run folder records.

A setting either changes the run's maths (model shape, batch, optimiser, objective, seed, data:
they form the run's *identity*, and a run folder holding another identity is refused) or only
how and where it is computed (steps to go, device, precision, micro-batch, sharding, how often
to save, log, sample and evaluate), which a resume may change freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from selfflow.base.classes import NUM_IMAGENET_CLASSES, imagenet_classes
from selfflow.base.errors import ConfigurationError
from selfflow.model.network import ModelConfig
from selfflow.train.phema import check_sigma_rel

# SiT's sizes (width, depth, heads), all with 2 × 2 patches; "tiny" is ModelConfig.tiny()'s.
_TINY = ModelConfig.tiny()
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (_TINY.hidden_size, _TINY.depth, _TINY.num_heads),
    "S/2": (384, 12, 6),
    "B/2": (768, 12, 12),
    "L/2": (1024, 24, 16),
    "XL/2": (1152, 28, 16),
}
METHODS = ("selfflow", "flow", "dual")
"""selfflow: dual-timestep scheduling + representation loss; flow: plain flow matching (SiT: no
mask, no representation loss); dual: dual-timestep scheduling without the representation loss
(the paper's "without L_rep" ablation row: no teacher forward, the flow baseline's cost)."""
DTYPES = ("bfloat16", "float32")
NETWORKS = ("fast", "plain")

# Settings a resume may change: they alter where and how fast the run is computed, or what is
# written besides it, but not which weights step k produces (up to float rounding).
RESUMABLE_CHANGES = frozenset(
    {
        "data",
        "output_dir",
        "steps",
        "batch_size",
        "device",
        "dtype",
        "fsdp",
        "network",
        "compile",
        "checkpoint_every",
        "keep_last",
        "keep_every",
        "eval_every",
        "eval_samples",
        "eval_ref",
        "val_data",  # validation reads the model, it never changes it
        "val_every",
        "val_samples",
        "sample_every",
        "log_every",
        "progress",
        "vae",  # where the VAE loads from; its encoder is checked against the data's
        "allow_vae_mismatch",
        # the label space is in the identity's model_config (num_classes) already
        "num_classes",
        "snapshot_every",  # post-hoc EMA snapshots: written beside the run, not its maths
    }
)


STREAMS_REVISION = 2
"""The revision of how a step's random numbers are drawn (:mod:`selfflow.train.streams`), part
of a run's identity: 1 seeded torch's generator (32 bits of each key kept), 2 keys numpy's
Philox with 128 bits and draws the per-row tensors in blocks. A run begun under another
revision would continue with other numbers, so its resume is refused, naming it."""


_ABLATIONS = {
    "dual": "dual-timestep scheduling without the representation loss",
    "flow": "plain flow matching, the SiT baseline",
}


def default_layer(fraction: float, depth: int) -> int:
    """``round(fraction · depth)`` rounding halves up (Python's ``round`` rounds 0.5 to 0)."""
    return math.floor(fraction * depth + 0.5)


@dataclass(frozen=True)
class TrainConfig:
    """The options of ``selfflow train`` (see ``selfflow train --help`` for each)."""

    data: str = ""
    output_dir: str = ""
    vae: str | None = None  # default: the VAE the dataset records
    allow_vae_mismatch: bool = False
    steps: int = 0
    model: str = "XL/2"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_classes: int | None = None  # default: the dataset's classes; null label = this number
    student_layer: int | None = None  # 1-based block; default round(0.3 · depth)
    teacher_layer: int | None = None  # 1-based block; default round(0.7 · depth)
    global_batch_size: int = 256
    batch_size: int | None = None  # per process and micro-batch; default: global / processes
    lr: float = 1e-4
    ema_decay: float = 0.9999
    mask_ratio: float | None = None  # default 0.25 (selfflow, dual) or 0 (flow)
    rep_weight: float | None = None  # default 0.8 (selfflow) or 0 (flow, dual)
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # default bfloat16 on CUDA, float32 elsewhere
    checkpoint_every: int = 10_000
    init_from: str | None = None
    method: str = "selfflow"
    fsdp: bool = False
    network: str = "fast"  # fast: FastTrainingDiT; plain: the model itself (reference twin)
    compile: bool | None = None  # torch.compile the fast network's block; default on CUDA only
    keep_last: int = 3
    keep_every: int | None = None
    eval_every: int = 0
    eval_samples: int = 10_000
    eval_ref: str | None = None
    val_data: str | None = None  # held-out dataset for the validation loss at fixed noise
    val_every: int = 0
    val_samples: int = 10_000  # rows of --val-data per validation (spread over it), at most
    sample_every: int = 10_000
    log_every: int = 100
    progress: bool = True
    posthoc_ema: tuple[float, ...] = ()  # σ_rel of power-function EMAs kept beside the EMA
    snapshot_every: int | None = None  # default: --checkpoint-every (with --posthoc-ema)

    def validate(self) -> None:
        """Checks that need no file, so a typo fails before anything is loaded."""
        if not self.data:
            raise ConfigurationError("--data is required: a dataset folder (selfflow prepare)")
        if not self.output_dir:
            raise ConfigurationError("--output-dir is required: the run folder")
        _whole("--steps", self.steps, 1)
        if self.model not in MODEL_SIZES:
            raise ConfigurationError(
                f"--model must be one of {', '.join(MODEL_SIZES)}; got {self.model!r}"
            )
        for name, value in (
            ("--hidden-size", self.hidden_size),
            ("--depth", self.depth),
            ("--num-heads", self.num_heads),
            ("--student-layer", self.student_layer),
            ("--teacher-layer", self.teacher_layer),
            ("--batch-size", self.batch_size),
            ("--keep-every", self.keep_every),
            ("--num-classes", self.num_classes),
        ):
            if value is not None:
                _whole(name, value, 1)
        _whole("--global-batch-size", self.global_batch_size, 1)
        _whole("--checkpoint-every", self.checkpoint_every, 1)
        _whole("--keep-last", self.keep_last, 1)
        _whole("--eval-every", self.eval_every, 0)
        _whole("--eval-samples", self.eval_samples, 1)
        _whole("--sample-every", self.sample_every, 0)
        _whole("--val-every", self.val_every, 0)
        _whole("--val-samples", self.val_samples, 1)
        _whole("--log-every", self.log_every, 1)
        _whole("--seed", self.seed, 0)
        _number("--lr", self.lr, 0.0, math.inf, low_open=True)
        # 0 <= decay < 1: at 1 the EMA (the teacher and the exported model) never moves
        _number("--ema-decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _number("--label-dropout", self.label_dropout, 0.0, 1.0, high_open=True)
        _number("--grad-clip", self.grad_clip, 0.0, math.inf, low_open=True)
        if self.mask_ratio is not None:
            _number("--mask-ratio", self.mask_ratio, 0.0, 1.0)
        if self.rep_weight is not None:
            _number("--rep-weight", self.rep_weight, 0.0, math.inf)
        if self.method not in METHODS:
            raise ConfigurationError(
                f"--method must be one of {', '.join(METHODS)}; got {self.method!r}"
            )
        if self.method == "flow":
            given = {"--mask-ratio": self.mask_ratio, "--rep-weight": self.rep_weight}
            clash = {k: v for k, v in given.items() if v not in (None, 0, 0.0)}
            if clash:
                raise ConfigurationError(
                    f"--method flow is plain flow matching (SiT): mask ratio 0 and no "
                    f"representation loss; it cannot take {clash}. Use --method selfflow."
                )
        if self.method == "dual" and self.rep_weight not in (None, 0, 0.0):
            raise ConfigurationError(
                f"--method dual is dual-timestep scheduling without the representation loss; "
                f"it cannot take --rep-weight {self.rep_weight}. Use --method selfflow."
            )
        if bool(self.val_every) != bool(self.val_data):
            raise ConfigurationError(
                "--val-every K and --val-data DIR go together (the validation loss every K "
                f"steps on the held-out dataset DIR); got {_one_of(self.val_every, self.val_data)}"
            )
        if self.network not in NETWORKS:
            raise ConfigurationError(f"--network must be fast or plain; got {self.network!r}")
        if self.compile and self.network == "plain":
            raise ConfigurationError(
                "--compile compiles the fast network's block; --network plain is the eager "
                "reference twin and is never compiled. Drop one of the two"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigurationError(f"--dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.eval_every and self.eval_ref is None:
            raise ConfigurationError(
                "--eval-every needs --eval-ref REF.npz (an ADM reference batch) to score against"
            )
        check_posthoc_options(self.posthoc_ema, self.snapshot_every)

    def resolve(
        self, latent_shape: tuple[int, int, int], num_classes: int, world_size: int = 1
    ) -> ResolvedConfig:
        """Every value made concrete for a dataset of ``latent_shape`` and ``num_classes``."""
        self.validate()
        model = model_config(self, latent_shape, num_classes)
        selfflow = self.method == "selfflow"
        dual = selfflow or self.method == "dual"  # the methods with dual-timestep scheduling
        mask_ratio = self.mask_ratio if self.mask_ratio is not None else 0.25 * dual
        rep_weight = self.rep_weight if self.rep_weight is not None else 0.8 * selfflow
        student, teacher, note = choose_layers(
            model.depth, self.student_layer, self.teacher_layer, rep_weight > 0
        )
        batch = micro_batch(self.global_batch_size, self.batch_size, world_size)
        notes = [note] if note else []
        same = "dual" if mask_ratio > 0 else "flow"  # the ablation these numbers make
        if rep_weight == 0 and self.method != same:
            notes.append(
                f"--method {self.method} with mask ratio {float(mask_ratio)} and rep weight 0 "
                f"is the same maths as --method {same} ({_ABLATIONS[same]}): no teacher "
                f"forward; the run keeps the name {self.method}"
            )
        return ResolvedConfig(
            settings=replace(
                self,
                hidden_size=model.hidden_size,
                depth=model.depth,
                num_heads=model.num_heads,
                student_layer=student,
                teacher_layer=teacher,
                mask_ratio=float(mask_ratio),
                rep_weight=float(rep_weight),
                batch_size=batch,
                posthoc_ema=tuple(sorted(float(v) for v in self.posthoc_ema)),
                snapshot_every=self.snapshot_every
                or (self.checkpoint_every if self.posthoc_ema else None),
            ),
            model=model,
            world_size=world_size,
            notes=notes,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """A :class:`TrainConfig` with every default filled in, and the model it trains."""

    settings: TrainConfig
    model: ModelConfig
    world_size: int
    notes: list[str]

    @property
    def accumulation(self) -> int:
        """Micro-batches per process per optimiser step."""
        s = self.settings
        return s.global_batch_size // (self.world_size * s.batch_size)

    @property
    def per_process(self) -> int:
        return self.settings.global_batch_size // self.world_size

    def identity(self) -> dict[str, Any]:
        """The settings that define the run's maths (a resume must keep them)."""
        values = {
            f.name: getattr(self.settings, f.name)
            for f in fields(self.settings)
            if f.name not in RESUMABLE_CHANGES
        }
        if values.get("posthoc_ema"):  # named on a resume that tracks others
            values["posthoc_ema"] = [float(v) for v in values["posthoc_ema"]]
        else:  # off: the recipe's identity (and run.json) as before the option existed
            values.pop("posthoc_ema", None)
        values["model_config"] = self.model.to_dict()
        values["streams_revision"] = STREAMS_REVISION
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "model": self.model.to_dict()}


def label_space_note(class_names: Sequence[str], num_classes: int) -> str | None:
    """A word when a 1000-class model trains on fewer classes that are not ImageNet's first K.

    Data label k trains the model's label k, which in the released model's label space is
    ImageNet class k. ``selfflow prepare`` keeps that true for WordNet-id folders; for other
    folders the trainer cannot tell a deliberate re-use of the label slots from a mistake, so it
    says which class lands where rather than refuse.
    """
    k = len(class_names)
    if num_classes != NUM_IMAGENET_CLASSES or k >= num_classes:
        return None
    standard = imagenet_classes()[:k]
    if list(class_names) == [c.wnid for c in standard]:
        return None
    first = next(i for i, c in enumerate(standard) if class_names[i] != c.wnid)
    return (
        f"the data's {k} classes are not ImageNet's first {k} (its class {first} is "
        f"{class_names[first]!r}; ImageNet's label {first} is {standard[first].wnid} "
        f"{standard[first].name!r}): a 1000-class model learns each data label k as ImageNet's "
        f"label k, so from a 1000-class checkpoint such as the released one "
        f"{standard[first].name!r} would be retrained on {class_names[first]!r}. For part of "
        f"ImageNet, make the data with `selfflow prepare --classes K` on ImageNet's train folder"
    )


def model_config(
    config: TrainConfig, latent_shape: tuple[int, int, int], num_classes: int
) -> ModelConfig:
    """The network for ``--model`` (and its overrides) on data of ``latent_shape``.

    Its label space is the dataset's ``num_classes`` unless ``--num-classes`` widens it: a
    subset prepared with ``selfflow prepare --classes K`` keeps ImageNet's labels 0..K-1, so
    ``--num-classes 1000`` trains in the released model's label space (null label 1000) and can
    start from its checkpoint.
    """
    channels, height, width = (int(n) for n in latent_shape)
    patch = 2
    if height != width or height % patch or height < patch:
        raise ConfigurationError(
            f"the dataset's latents are {channels} × {height} × {width}; the model needs square "
            f"latents whose side is a multiple of the patch size {patch}"
        )
    if config.num_classes is not None:
        if config.num_classes < num_classes:
            raise ConfigurationError(
                f"--num-classes {config.num_classes}: the dataset has {num_classes} classes "
                f"(labels 0..{num_classes - 1}); the model needs at least that many"
            )
        num_classes = config.num_classes
    hidden, depth, heads = MODEL_SIZES[config.model]
    hidden = config.hidden_size or hidden
    depth = config.depth or depth
    heads = config.num_heads or heads
    try:
        return ModelConfig(
            input_size=height,
            patch_size=patch,
            in_channels=channels,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=int(num_classes),
            # The released projector is 1152 → 2304: twice the width, kept for every size.
            projector_dim=2 * hidden,
        )
    except ValueError as error:
        raise ConfigurationError(
            f"--model {config.model} with --hidden-size {hidden} --depth {depth} "
            f"--num-heads {heads}: {error}"
        ) from error


def choose_layers(
    depth: int, student: int | None, teacher: int | None, needed: bool
) -> tuple[int, int, str | None]:
    """The 1-based blocks whose outputs the representation loss aligns, and a note if adjusted.

    Defaults are ``round(0.3·depth)`` and ``round(0.7·depth)`` (8 and 20 for depth 28). The
    teacher must sit deeper than the student, or the loss would ask a block to predict
    itself. For small depths where the defaults coincide (depth 2: both 1) the teacher's
    default moves one block deeper; layers the user gave are never moved: a student layer at
    or above the teacher layer is refused. Without a representation loss (``needed`` false)
    the layers are unused, recorded only.
    """
    auto_student = max(1, default_layer(0.3, depth))
    auto_teacher = min(depth, default_layer(0.7, depth))
    s = student if student is not None else auto_student
    t = teacher if teacher is not None else auto_teacher
    note = None
    for name, value in (("--student-layer", s), ("--teacher-layer", t)):
        if not 1 <= value <= depth:
            raise ConfigurationError(
                f"{name} {value} is not a block of a depth-{depth} model (1 … {depth})"
            )
    if needed and t <= s:
        if teacher is None and s + 1 <= depth:
            note = (
                f"depth {depth}: the default teacher layer round(0.7·{depth}) = {t} is not "
                f"deeper than the student layer {s}; using teacher layer {s + 1}"
            )
            t = s + 1
        else:
            raise ConfigurationError(
                f"the representation loss needs the teacher layer deeper than the student "
                f"layer; got student {s}, teacher {t} for depth {depth}"
                + (
                    " (a depth-1 model has no two blocks: use --method flow or --depth 2 or more)"
                    if depth == 1
                    else ""
                )
            )
    return s, t, note


def micro_batch(global_batch: int, batch_size: int | None, world_size: int) -> int:
    """The per-process micro-batch; the global batch must split evenly over processes and
    micro-batches, or the steps would weight samples unequally."""
    if global_batch % world_size:
        raise ConfigurationError(
            f"--global-batch-size {global_batch} does not divide over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    per_process = global_batch // world_size
    batch = per_process if batch_size is None else batch_size
    if per_process % batch:
        raise ConfigurationError(
            f"--batch-size {batch} does not divide the {per_process} samples each of the "
            f"{world_size} processes takes per step (--global-batch-size {global_batch}); "
            f"use a divisor of {per_process}"
        )
    return batch


def differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"name: stored → current"`` for every identity setting that differs; nested settings
    (the model's config) by their own names, e.g. ``model_config.num_classes: 25 → 10``."""
    found = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        else:
            shown_old = "(absent)" if key not in stored else repr(old)
            shown_new = "(absent)" if key not in current else repr(new)
            found.append(f"{prefix}{key}: {shown_old} → {shown_new}")
    return found


def check_posthoc_options(sigma_rels: object, snapshot_every: object) -> None:
    """``--posthoc-ema``: distinct σ_rel values of the power-function family;
    ``--snapshot-every`` only with them."""
    if not isinstance(sigma_rels, (list, tuple)):
        raise ConfigurationError(f"--posthoc-ema takes σ_rel values; got {sigma_rels!r}")
    for value in sigma_rels:
        check_sigma_rel(value, "--posthoc-ema")
    if len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigurationError(f"--posthoc-ema lists a σ_rel twice: {list(sigma_rels)}")
    if snapshot_every is not None:
        _whole("--snapshot-every", snapshot_every, 1)
        if not sigma_rels:
            raise ConfigurationError(
                "--snapshot-every writes snapshots of post-hoc EMAs; it needs --posthoc-ema "
                "SIGMA_REL ... (e.g. --posthoc-ema 0.05 0.10)"
            )


def _one_of(val_every: int, val_data: str | None) -> str:
    """The validation option given without its partner, in words (not a Python ``None``)."""
    if val_every:
        return f"--val-every {val_every} and no --val-data"
    return f"--val-data {val_data} and no --val-every"


def _whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be a whole number >= {minimum}; got {value!r}")


def _number(
    name: str,
    value: Any,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse ``value`` unless it is a finite number in the interval (``high`` may be inf).

    Infinity and NaN are refused even where the interval is unbounded: an infinite learning
    rate or clip norm would only show up as NaN weights later, after files were written.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        raise ConfigurationError(
            f"{name} must be a finite number in {left}{low}, {high}{right}; got {value!r}"
        )
