"""What the training loop costs around the objective: ``selfflow train`` against bare steps.

Trains the same model on the same batches twice: once through :func:`selfflow.train.train`
(keyed streams drawn and the dataset read on the prefetch thread, EMA, metrics, log.jsonl and
TensorBoard every step, one checkpoint at the end), once as a bare loop over pre-made batches
(loss, backward, clip, AdamW, EMA; nothing else). The difference is the loop's overhead (the
per-step metrics reduction, the bar, start-up: the dataset, folder checks, the checkpoint at the
end; TensorBoard's import is left out); the stream draws are timed alone as well.

    python benchmarks/train_loop.py --steps 200 --batch 64 --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.data import LatentDataset, write_dataset
from selfflow.train import TrainConfig, self_flow_loss, train
from selfflow.train.ema import make_ema, update_ema
from selfflow.train.fast import FastTrainingDiT, training_optimizer
from selfflow.train.streams import draw_step, materialise, run_streams
from selfflow.train.trainer import initial_model


def bare_loop(config: TrainConfig, data: Path, steps: int) -> float:
    """Seconds for ``steps`` objective steps on batches made beforehand."""
    dataset = LatentDataset(data)
    resolved = config.resolve(tuple(dataset.latent_shape), dataset.num_classes)
    s, m = resolved.settings, resolved.model
    spec, order = run_streams(resolved, dataset)
    batches = [materialise(draw_step(spec, order, k), dataset, m.null_class) for k in range(steps)]
    model = FastTrainingDiT.from_model(initial_model(resolved, None))
    ema = make_ema(model)
    optimizer = training_optimizer(model.parameters(), lr=s.lr)
    started = time.perf_counter()
    for batch in batches:
        loss, _ = self_flow_loss(
            model, ema, batch.x0, batch.y, noise=batch.noise, tau=batch.tau,
            tau_teacher=batch.tau_teacher, rep_weight=s.rep_weight,
            student_layer=s.student_layer, teacher_layer=s.teacher_layer,
        )  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, s.ema_decay)
    return time.perf_counter() - started


def draw_seconds(config: TrainConfig, data: Path, steps: int) -> float:
    dataset = LatentDataset(data)
    resolved = config.resolve(tuple(dataset.latent_shape), dataset.num_classes)
    spec, order = run_streams(resolved, dataset)
    started = time.perf_counter()
    for k in range(steps):
        materialise(draw_step(spec, order, k), dataset, resolved.model.null_class)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        rng = np.random.default_rng(0)
        means = rng.standard_normal((2048, 4, 8, 8)).astype(np.float32)
        write_dataset(data, means, np.arange(2048) % 10, stds=np.full_like(means, 0.3))
        config = TrainConfig(
            data=str(data), output_dir=str(Path(tmp) / "run"), steps=args.steps, model="tiny",
            global_batch_size=args.batch, checkpoint_every=args.steps, sample_every=0,
            log_every=100, progress=False, device="cpu",
        )  # fmt: skip
        bare = bare_loop(config, data, args.steps)
        draws = draw_seconds(config, data, args.steps)
        importlib.import_module("torch.utils.tensorboard")  # once per process, not timed
        started = time.perf_counter()
        train(config, log=lambda _: None)
        full = time.perf_counter() - started
    rows = [
        ("bare objective steps (batches made beforehand)", bare),
        (
            "selfflow train (prefetch thread, metrics every step, logs every 100, 1 checkpoint)",
            full,
        ),
        ("stream draws + dataset reads alone", draws),
    ]
    print(f"tiny model, 4x8x8 latents, global batch {args.batch}, {args.steps} steps, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")  # fmt: skip
    print("| loop | ms per step |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds / args.steps:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
