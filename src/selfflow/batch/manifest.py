"""``manifest.json``: what an output folder holds and every setting that changes its images.

A re-run in the same folder continues only when its ``settings`` equal the manifest's; if any
differs it is refused with the names of the differing settings, so shards made under one
configuration are never mixed with another's. Settings that cannot change an image are
normalised away (the ODE solver under the SDE, the guidance interval at ``cfg_scale = 1``), so
they never block a resume. ``info`` is for people (paths, times, versions, machines) and is
never compared; ``plan`` fixes the shard size; ``complete`` is set once the npz is written.

The code's part of the settings is :data:`SAMPLING_REVISION`, not the package version: an
upgrade that leaves the images alone must still resume a half-finished 50 000-image run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfflow.base.errors import ConfigurationError
from selfflow.base.files import replaced_atomically

MANIFEST_NAME = "manifest.json"
FORMAT = "selfflow-fid-batch"
FORMAT_VERSION = 1

SAMPLING_REVISION = 4
"""The revision of the image maths, compared on resume (the package version is only recorded).

Bump it only in a change that makes the same settings give other images: how the per-sample
noise and labels are keyed (``selfflow.base.seeds``), the samplers (``selfflow.sampling.transport``), the
network's numerics on either path (``selfflow.model.network``, ``selfflow.model.inference``), or the decoding and
rounding to bytes (``selfflow.model.vae``). Shards of two revisions are then never mixed in one npz.
Refactors, speed-ups that keep the numbers, and changes to files, logging or the CLI leave it
alone.

History: 2 — the fast path computes fc1's bias and GELU in the cuBLASLt epilogue on CUDA (one
bf16 rounding fewer: bf16 images move by rounding, the float32 path is unchanged).
3 — the VAE decodes in fixed chunks of 8 latents and every process samples in batches of
min(--batch-size, N) rows, whatever its share of the work (images move by rounding, a level in
a few pixels; in exchange an image's bytes no longer depend on how the work is cut).
4 — every keyed stream (label, start noise, Brownian increments, the class-balanced order) is
numpy's Philox keyed by 128 bits of its hash (``selfflow.base.seeds.keyed_rng``); the first three
were torch generators, which keep only 32 bits of a seed (every image changes).
"""


def image_settings(
    *,
    checkpoint_sha256: str,
    vae: str,
    num_samples: int,
    num_steps: int,
    mode: str,
    solver: str,
    seed: int,
    cfg_scale: float,
    guidance_low: float,
    guidance_high: float,
    class_balanced: bool,
    num_classes: int,
    dtype: str,
    network: str,
    vae_dtype: str,
    sampling_revision: int = SAMPLING_REVISION,
) -> dict[str, Any]:
    """The settings that decide the images, in a canonical form that compares exactly."""
    mode = mode.lower()
    guided = float(cfg_scale) != 1.0
    return {
        "checkpoint_sha256": checkpoint_sha256,
        "vae": vae,
        "num_samples": int(num_samples),
        "num_steps": int(num_steps),
        "mode": mode,
        "solver": solver.lower() if mode == "ode" else None,  # the SDE is always Euler–Maruyama
        "seed": int(seed),
        "cfg_scale": float(cfg_scale),
        "guidance_low": float(guidance_low) if guided else None,
        "guidance_high": float(guidance_high) if guided else None,
        "class_balanced": bool(class_balanced),
        "num_classes": int(num_classes),  # labels are drawn from 0..num_classes-1
        "dtype": dtype,
        "network": network,
        "vae_dtype": vae_dtype,
        "sampling_revision": int(sampling_revision),
    }


@dataclass
class Manifest:
    settings: dict[str, Any]
    shard_size: int
    image_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)
    complete: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "settings": self.settings,
            "plan": {
                "num_samples": self.settings["num_samples"],
                "shard_size": self.shard_size,
                "image_shape": list(self.image_shape),
            },
            "complete": self.complete,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Manifest:
        try:
            if data.get("format") != FORMAT:
                raise ConfigurationError(
                    f"{path} is not a selfflow sample manifest (format {data.get('format')!r})"
                )
            if data.get("format_version") != FORMAT_VERSION:
                raise ConfigurationError(
                    f"{path} has manifest format version {data.get('format_version')}; this "
                    f"selfflow reads version {FORMAT_VERSION}. Use --overwrite to start over"
                )
            plan = data["plan"]
            return cls(
                settings=dict(data["settings"]),
                shard_size=int(plan["shard_size"]),
                image_shape=tuple(int(n) for n in plan["image_shape"]),  # type: ignore[arg-type]
                info=dict(data.get("info") or {}),
                complete=data.get("complete"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, ConfigurationError):
                raise
            raise ConfigurationError(
                f"{path} is damaged ({type(error).__name__}: {error}); use --overwrite to start over"
            ) from error


def read_manifest(output_dir: Path) -> Manifest | None:
    path = Path(output_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigurationError(
            f"{path} is unreadable ({type(error).__name__}: {error}); use --overwrite to start over"
        ) from error
    return Manifest.from_json(data, path)


def write_manifest(output_dir: Path, manifest: Manifest) -> Path:
    """Atomically replace ``manifest.json``."""
    path = Path(output_dir) / MANIFEST_NAME
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    return path


def differing_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: stored → current`` for every setting that differs (missing counts as differing)."""
    names = list(stored) + [name for name in current if name not in stored]
    return [
        f"{name}: {stored.get(name)!r} in the folder, {current.get(name)!r} now"
        for name in names
        if stored.get(name) != current.get(name)
    ]
