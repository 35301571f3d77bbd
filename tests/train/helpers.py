"""Tiny datasets and runs for the trainer's tests (CPU, float32, a few steps)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from selfflow.data import write_dataset
from selfflow.train.config import TrainConfig
from selfflow.train.state import checkpoint_path, list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parents[2]


def make_dataset(folder: Path, n: int = 40, shape=(4, 8, 8), classes: int = 10, std=True) -> Path:
    """Random latents with a posterior std (so the posterior draws matter) and labels."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((n, *shape)).astype(np.float32)
    labels = np.arange(n) % classes
    stds = np.full((n, *shape), 0.3, np.float32) if std else None
    write_dataset(folder, means, labels, stds=stds, class_names=[f"c{i}" for i in range(classes)])
    return folder


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        data=str(data),
        output_dir=str(out),
        steps=4,
        model="tiny",
        global_batch_size=8,
        lr=1e-3,  # large enough that a few steps change the weights visibly
        ema_decay=0.5,  # so the EMA (the teacher) moves too
        checkpoint_every=2,
        sample_every=0,
        log_every=1,
        progress=False,
        device="cpu",
    )
    return replace(base, **overrides)


def cli_args(config: TrainConfig) -> list[str]:
    """The command line of ``config`` (only the options the tests vary)."""
    args = [
        "--data", config.data, "--output-dir", config.output_dir, "--steps", str(config.steps),
        "--model", config.model, "--global-batch-size", str(config.global_batch_size),
        "--lr", str(config.lr), "--ema-decay", str(config.ema_decay),
        "--checkpoint-every", str(config.checkpoint_every), "--sample-every", "0",
        "--log-every", "1", "--no-progress", "--device", "cpu", "--seed", str(config.seed),
        "--keep-last", str(config.keep_last),
    ]  # fmt: skip
    if config.batch_size is not None:
        args += ["--batch-size", str(config.batch_size)]
    if config.method != "selfflow":
        args += ["--method", config.method]
    if config.fsdp:
        args += ["--fsdp"]
    return args


def final_state(run: Path, step: int | None = None) -> dict:
    if step is None:
        step = list_checkpoints(run)[-1][0]
    return read_checkpoint(checkpoint_path(run, step))


def assert_states_equal(a: dict, b: dict) -> None:
    """Bit-identical model, EMA and optimiser state."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for key, entry in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][key]
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other[name])), (key, name)


def assert_states_close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Equal up to float reordering, and the runs actually trained (weights moved)."""
    for part in ("model", "ema"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=rtol, atol=atol)


def log_records(run: Path, kind: str | None = None) -> list[dict]:
    """The lines of ``log.jsonl`` of one kind: the training windows (no ``kind``) by default,
    else ``"eval"`` or ``"checkpoint"`` lines."""
    lines = (Path(run) / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("kind") == kind]


def logged_steps(run: Path) -> dict[int, dict]:
    """The training lines of ``log.jsonl`` by step (a resumed run's later line wins)."""
    return {record["step"]: record for record in log_records(run)}


def assert_logs_close(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """The two runs logged the same loss and gradient norm at every step.

    Weights alone cannot show a wrongly scaled gradient: clipping rescales it to the clip norm
    and AdamW divides by its own running size, so a gradient k times too large moves the
    weights almost exactly as the right one does. The logged norm (before clipping) and loss
    are where such a factor shows.
    """
    left, right = logged_steps(a), logged_steps(b)
    assert left.keys() == right.keys(), (sorted(left), sorted(right))
    assert left, f"{a} logged no steps"
    for step in sorted(left):
        for name in ("loss", "grad_norm"):
            expected, found = left[step][name], right[step][name]
            assert abs(found - expected) <= rtol * abs(expected), (
                f"step {step}: {name} {found} in {b} but {expected} in {a}"
            )


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Size, modification time and inode of the folder and of everything in it: a file that
    was rewritten (even atomically, to the same size) or created and deleted shows."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in [folder, *sorted(folder.rglob("*"))]
    }
