"""Find, download, read, validate and write Self-Flow checkpoints.

The official loader takes ``strict=False``, so a wrong file silently becomes a random model.
Here every key and shape is checked, every tensor must be finite, and the file is read with
``torch.load(weights_only=True)`` (no pickled code is ever executed).

Accepted layouts (those of the official release):

* the released ``selfflow_imagenet256.pt``: a bare state dict, or one wrapped under ``ema``,
  ``model`` or ``state_dict``; keys may carry ``module.`` (DDP) or ``_orig_mod.``
  (``torch.compile``) prefixes. When both ``ema`` and ``model`` are present the EMA weights are
  loaded: they are the ones the paper evaluates.
* files written by :func:`save_model`: ``{"format": "selfflow", "config": {...}, "card": {...},
  "state_dict": ...}`` (``.pt``), or a ``.safetensors`` file whose metadata holds the config
  and the card (``selfflow_config``, ``selfflow_card``). The card (:mod:`selfflow.model.card`) names
  the model's classes and its VAE; files without one are taken as the released model's.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfflow.base.classes import NUM_IMAGENET_CLASSES, ImageNetClass
from selfflow.base.errors import CheckpointError, DownloadError
from selfflow.base.files import file_sha256 as file_sha256  # re-exported for callers of this module
from selfflow.base.files import replaced_atomically
from selfflow.model.card import RELEASED, ModelCard
from selfflow.model.network import ModelConfig, SelfFlowDiT

logger = logging.getLogger(__name__)

HUB_REPO_ID = "Hila/Self-Flow"
HUB_FILENAME = "selfflow_imagenet256.pt"
HUB_URL = f"https://huggingface.co/{HUB_REPO_ID}/resolve/main/{HUB_FILENAME}"
FORMAT_TAG = "selfflow"
TRAINING_FORMAT_TAG = "selfflow-train"
"""A checkpoint of ``selfflow train`` (weights, EMA, optimizer; written by
:mod:`selfflow.train.state`): its identity records the model config and it carries the card, so
it loads here as its EMA, like the export beside it."""
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = ("ema", "model", "state_dict")  # in order of preference
_MAX_LISTED = 8


@dataclass
class CheckpointInfo:
    """Where the weights came from, for manifests and for the user."""

    path: Path
    source_entry: (
        str | None
    )  # the top-level entry the weights were taken from, None for a bare dict
    config: ModelConfig
    notes: list[str] = field(default_factory=list)
    # classes and VAE it was trained with (selfflow.model.card); RELEASED for files without one
    card: ModelCard = RELEASED


# ----------------------------------------------------------------------------------------------
# Download


def manual_checkpoint_path() -> Path:
    """Where a checkpoint copied by hand is found: ``$SELFFLOW_CACHE/selfflow_imagenet256.pt``."""
    from selfflow.base.cache import cache_dir

    return cache_dir() / HUB_FILENAME


def download_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The released checkpoint: a copy placed by hand at :func:`manual_checkpoint_path`, else
    huggingface_hub's cached download (fetched on first use).

    Offline (or when the hub cannot be reached) the error says how to get the file and where
    to put it.
    """
    manual = manual_checkpoint_path()
    if manual.is_file():
        return manual
    from huggingface_hub import hf_hub_download

    from selfflow.base.download import hub_failure_cause, hub_unreachable

    # a hub that cannot be reached is named at once and its cache alone is read (no retries)
    unreachable = hub_unreachable(HUB_REPO_ID, HUB_FILENAME)
    try:
        return Path(
            hf_hub_download(
                HUB_REPO_ID,
                HUB_FILENAME,
                cache_dir=cache_dir,
                **({"local_files_only": True} if unreachable else {}),
            )
        )
    except Exception as error:  # the hub raises many types: offline, HTTP, missing entry
        raise DownloadError(
            f"could not get {HUB_FILENAME} from the Hugging Face repo {HUB_REPO_ID} "
            f"({hub_failure_cause(error, unreachable)}). Download it by hand from {HUB_URL} "
            f"and either put it at {manual} (found there automatically) or pass its path "
            f"(--ckpt PATH, or load_model(PATH))."
        ) from error


# ----------------------------------------------------------------------------------------------
# Reading


def verify_torch_archive(path: str | os.PathLike, chunk_size: int = 1 << 22) -> None:
    """Check every entry of a ``torch.save`` zip archive against its stored CRC-32.

    ``torch.load`` never checks the archive's CRC-32s, so bytes flipped inside the tensor data
    load silently as wrong weights. One streaming pass over the file (the released 2.7 GB
    checkpoint costs about as long as reading it from disk, the CRC runs at several GB/s)
    names the damaged entry instead. Files that are not zip archives (legacy ``torch.save``
    files, text) pass through: the reader that follows reports what they are.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":  # begins as a zip, but its directory is lost
                raise CheckpointError(
                    f"{path} is not a readable PyTorch checkpoint: it begins as a torch.save "
                    f"zip archive but its zip directory at the end is missing or broken (the "
                    f"file is damaged: truncated or overwritten); copy or download it again"
                )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as entry:
                    while entry.read(chunk_size):
                        pass
    except Exception as error:  # zipfile raises many types for damage (BadZipFile, OSError,
        # EOFError, ValueError, NotImplementedError for a flipped flag bit, ...): all are damage
        raise CheckpointError(
            f"{path} is damaged: {type(error).__name__}: {error} (the archive's structure or "
            f"CRC-32 check failed; the file was changed after it was written: copy or download "
            f"it again)"
        ) from error


def torch_load_verified(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` on the CPU after :func:`verify_torch_archive`.

    Every reader of ``.pt`` files in the package (models, training state) goes through here,
    so damage is named, never loaded. ``mmap=True`` maps the tensors instead of copying them:
    processes that read the same file (every rank at a training resume) share the page cache.
    """
    path = Path(path)
    verify_torch_archive(path)
    return _torch_load(path, mmap=mmap)


def _check_torch_file_kind(path: Path) -> None:
    """Refuse, by its first bytes, a file that cannot be a ``torch.save`` file at all.

    ``torch.save`` writes a zip archive (``PK\\x03\\x04``); files of torch < 1.6 are a pickle
    (first byte 0x80). Anything else (a git-lfs pointer, an HTML error page saved as the
    download, a text file) would otherwise reach the unpickler and be reported as "pickled
    objects", which sends users looking for the wrong problem.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a torch.save file")
    if head.startswith(b"version https://git-lfs"):
        kind = "a git-lfs pointer (the real file was never fetched: run git lfs pull)"
    elif head.lstrip()[:1] == b"<":
        kind = "an HTML or XML page (a failed download saved as the file?)"
    else:
        try:
            head.decode("utf-8")
            kind = "text"
        except UnicodeDecodeError:
            kind = "neither a zip archive nor a pickle"
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint: it is {kind}, starting with {head[:24]!r}; "
        f"a torch.save file is a zip archive (starts with b'PK')"
    )


def _torch_load(path: Path, mmap: bool = False) -> object:
    _check_torch_file_kind(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # not a pickle at all (text, garbage)
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (torch.load could not read it: "
                f"{str(error).splitlines()[0]})"
            ) from error
        raise CheckpointError(
            f"{path} stores pickled Python objects besides tensors, and selfflow only loads "
            f"checkpoints with torch.load(weights_only=True), which never runs code from a file. "
            f"If you trust the file, re-save just its tensors: "
            f"torch.save(torch.load(path, weights_only=False)['model'], 'clean.pt'). "
            f"(torch said: {str(error).splitlines()[0]})"
        ) from error
    except Exception as error:  # torch raises many types for damaged files (EOF, zip, index)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not a torch.save file): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def _unwrap(raw: object, path: Path) -> tuple[Mapping[str, object], str | None, list[str]]:
    """Pick the state dict out of a checkpoint's top level."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}; expected a dict of tensors (a state dict) "
            f"or a dict with one of the entries {list(_WRAPPERS)}"
        )
    notes: list[str] = []
    present = [key for key in _WRAPPERS if isinstance(raw.get(key), Mapping)]
    if not present:
        return raw, None, notes
    chosen = present[0]
    if chosen == "ema" and "model" in present:
        notes.append(
            f"{path.name} holds both 'model' and 'ema' weights; loading 'ema', "
            f"the weights the paper evaluates"
        )
    return raw[chosen], chosen, notes


def _strip_prefixes(state: Mapping[str, object]) -> dict[str, object]:
    cleaned: dict[str, object] = {}
    for key, value in state.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        if name in cleaned:
            raise CheckpointError(
                f"two entries map to the key {name!r} after removing prefixes {_PREFIXES}"
            )
        cleaned[name] = value
    return cleaned


def read_checkpoint(
    path: str | os.PathLike, *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], ModelConfig | None, str | None, list[str], ModelCard]:
    """Read a checkpoint file into ``(state_dict, stored_config, source_entry, notes, card)``.

    ``stored_config`` is None for files that do not record one (the released file); ``card``
    is :data:`selfflow.model.card.RELEASED` for them.
    ``mmap=True`` maps a ``.pt`` file's tensors instead of copying them (for weights that are
    copied into a model once and then dropped).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; expected a .pt or .safetensors file"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .pt or .safetensors file)")
    stored_config: ModelConfig | None = None
    if path.suffix == ".safetensors":
        state, metadata = _safetensors_load(path)
        if "selfflow_config" in metadata:
            stored_config = _parse_config(json.loads(metadata["selfflow_config"]), path)
        card = _parse_card(metadata.get("selfflow_card"), path, encoded=True)
        return _strip_prefixes(state), stored_config, None, [], card  # type: ignore[return-value]

    raw = torch_load_verified(path, mmap=mmap)
    card, stored_config = _recorded(raw, path)
    state, entry, notes = _unwrap(raw, path)
    state = _strip_prefixes(state)
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: expected a state dict of tensors, but these entries are not tensors: "
            f"{_listing(not_tensors)}"
        )
    return state, stored_config, entry, notes, card  # type: ignore[return-value]


def _parse_card(values: object, path: Path, encoded: bool = False) -> ModelCard:
    """The stored card (JSON text in safetensors metadata); RELEASED when there is none."""
    if values is None:
        return RELEASED
    try:
        return ModelCard.from_dict(json.loads(str(values)) if encoded else values)
    except ValueError as error:  # json's errors are ValueErrors too
        raise CheckpointError(f"{path}: the stored model card is damaged: {error}") from error


def read_card(path: str | os.PathLike | None) -> tuple[ModelCard, ModelConfig | None]:
    """A checkpoint's card and stored config without reading its weights (``None``: the
    released model), for checks that must come before a model is loaded (``generate --class``).

    A ``.pt`` is mapped, not read (its CRCs are checked when the model is loaded).
    """
    if path is None:
        return RELEASED, None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .pt or .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
        config = metadata.get("selfflow_config")
        return (
            _parse_card(metadata.get("selfflow_card"), path, encoded=True),
            None if config is None else _parse_config(json.loads(config), path),
        )
    raw = _torch_load(path, mmap=zipfile.is_zipfile(path))  # torch < 1.6 files cannot be mapped
    return _recorded(raw, path)


def _recorded(raw: object, path: Path) -> tuple[ModelCard, ModelConfig | None]:
    """The card and model config a ``.pt``'s top level records: an export's, a training
    checkpoint's (its config is in the run identity), or none (the released file)."""
    if not isinstance(raw, Mapping):
        return RELEASED, None
    if raw.get("format") == FORMAT_TAG:
        return _parse_card(raw.get("card"), path), _parse_config(raw.get("config"), path)
    if raw.get("format") == TRAINING_FORMAT_TAG:
        identity = raw.get("identity")
        values = identity.get("model_config") if isinstance(identity, Mapping) else None
        return _parse_card(raw.get("card"), path), _parse_config(values, path)
    return RELEASED, None


def checkpoint_classes(path: str | os.PathLike | None) -> tuple[ImageNetClass, ...]:
    """The classes of the model in ``path`` (``None``: the released model's, ImageNet's), from
    its card without loading its weights, so a wrong ``--class`` fails before the model loads."""
    card, config = read_card(path)
    return card.classes(config.num_classes if config is not None else NUM_IMAGENET_CLASSES)


def _parse_config(values: object, path: Path) -> ModelConfig:
    if not isinstance(values, Mapping):
        raise CheckpointError(
            f"{path}: the stored 'config' is a {type(values).__name__}, expected a dict"
        )
    try:
        return ModelConfig.from_dict(dict(values))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the stored model config is invalid: {error}") from error


def infer_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The config of a file that does not store one: the released XL/2 when the shapes match."""
    reference = ModelConfig.xl_2()
    proj = state.get("x_embedder.proj.weight")
    if proj is not None and tuple(proj.shape) != (reference.hidden_size, 16):
        raise CheckpointError(
            f"this checkpoint stores no model config and its shapes are not the released XL/2 "
            f"(x_embedder.proj.weight is {tuple(proj.shape)}, expected (1152, 16)); "
            f"pass config=ModelConfig(...) to load_model"
        )
    return reference


# ----------------------------------------------------------------------------------------------
# Validation


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_keys_and_shapes(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    what: str,
    *,
    allow_unexpected: bool = False,
) -> None:
    """Raise naming every missing key, unexpected key and wrong shape of ``state``.

    The one key-and-shape check of the package: strict loading (:func:`validate_state_dict`)
    and the fast path's reader, which takes the keys it uses from a larger state dict
    (``allow_unexpected``), both call it. ``what`` begins the message ("PATH does not match …").
    """
    missing = [key for key in expected if key not in state]
    unexpected = [] if allow_unexpected else [key for key in state if key not in expected]
    wrong_shape = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(state[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shapes ({_listing(wrong_shape)})")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def validate_state_dict(
    state: Mapping[str, torch.Tensor], model: SelfFlowDiT, path: Path | str = "checkpoint"
) -> None:
    """Strict check of keys, shapes and finiteness; raises with every problem listed."""
    check_keys_and_shapes(
        state, model.state_dict(), f"{path} does not match the Self-Flow model {model.config}"
    )
    not_float = [key for key, value in state.items() if not value.is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"{path}: expected floating-point tensors; found integer tensors at {_listing(not_float)}"
        )
    not_finite = [key for key, value in state.items() if not bool(torch.isfinite(value).all())]
    if not_finite:
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in {_listing(not_finite)}")


# ----------------------------------------------------------------------------------------------
# Public API


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
) -> SelfFlowDiT:
    """Load a Self-Flow model, strictly, in eval mode.

    ``path=None`` downloads (or finds in the cache) the released checkpoint. The returned model
    carries a :class:`CheckpointInfo` as ``model.checkpoint_info``.
    """
    if path is None:
        path = download_checkpoint()
    path = Path(path)
    state, stored_config, entry, notes, card = read_checkpoint(path)
    if config is not None and stored_config is not None and config != stored_config:
        raise CheckpointError(
            f"{path} stores the config {stored_config}, which differs from the config passed in {config}"
        )
    config = config or stored_config or infer_config(state)
    with torch.device("meta"):
        model = SelfFlowDiT(config)
    validate_state_dict(state, model, path)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for note in notes:
        logger.warning(note)
    model.checkpoint_info = CheckpointInfo(
        path=path, source_entry=entry, config=config, notes=notes, card=card
    )
    return model


def save_model(model: SelfFlowDiT, path: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Write the model with its config and card, atomically: ``.safetensors`` by suffix, else
    ``torch.save``. ``card`` defaults to the one the model was loaded with (else RELEASED)."""
    path = Path(path)
    if card is None:
        info = getattr(model, "checkpoint_info", None)
        card = info.card if info is not None else RELEASED
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    config = model.config.to_dict()
    with replaced_atomically(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {
                "selfflow_config": json.dumps(config),
                "selfflow_card": json.dumps(card.to_dict()),
            }
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(
                {
                    "format": FORMAT_TAG,
                    "config": config,
                    "card": card.to_dict(),
                    "state_dict": state,
                },
                tmp,
            )
    return path
