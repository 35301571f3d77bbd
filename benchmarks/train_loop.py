"""What the training loop costs around its step: ``selfflow train`` against the bare step.

Trains the same model on the same kind of data twice, both with ``selfflow train``'s own step
(:class:`selfflow.train.step.TrainStep`):

* **bare**: the step alone, over micro-batches drawn beforehand and already on the device;
* **loop**: :func:`selfflow.train.train` itself on a dataset folder of random posterior means
  and standard deviations (memory-mapped shards, a fresh posterior sample per step, keyed
  streams drawn and pinned on the prefetch thread, the host copy, summaries read one step
  behind, ``log.jsonl`` and TensorBoard every ``--log-every`` steps, a checkpoint at the end).

Both are timed the same way, in windows of ``--log-every`` steps after a first window of
warm-up (compilation): the loop's own ``steps_per_s`` records in ``log.jsonl``, the bare step
by the wall clock with the device synchronised at each window's end. The median window of each
is reported; the loop is within 5 % of the bare step when its data path keeps up. Two costs the
windows leave out are reported beside them: drawing and reading one step's batch on the host
(the prefetch thread's work, which must stay below a step; the loop's logged ``data_wait`` says
whether it did) and writing the checkpoint (from the loop's ``"checkpoint"`` line in
``log.jsonl``), with its share of the steps between two checkpoints at the default
``--checkpoint-every``.

    python benchmarks/train_loop.py --steps 200 --batch 64 --threads 1           # CPU, tiny
    python benchmarks/train_loop.py --model XL/2 --device cuda --batch 64 --steps 60 --log-every 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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

from selfflow.base.distributed import resolve_device, resolve_dtype
from selfflow.data import LatentDataset, write_dataset
from selfflow.train import TrainConfig, train
from selfflow.train.network import FastTrainingDiT
from selfflow.train.step import StepRecipe
from selfflow.train.streams import draw_step, materialise, micro_batches, run_streams
from selfflow.train.weights import initial_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the throughput benchmark's helpers
from train_throughput import trainer_step  # noqa: E402


def bare_windows(
    config: TrainConfig, data: Path, device: torch.device
) -> tuple[list[float], list[float]]:
    """Seconds per step of each window of ``log_every`` steps of the bare step (the first,
    warm-up window left out), and the seconds the host took to draw and read each of the
    batches it cycles through (the trainer's prefetch thread does that for every step, and on
    CUDA also pins the batch, which this leaves out)."""
    dataset = LatentDataset(data)
    resolved = config.resolve(tuple(dataset.latent_shape), dataset.num_classes)
    s, m = resolved.settings, resolved.model
    spec, order = run_streams(resolved, dataset)
    batches, data_s = [], []
    for k in range(min(s.steps, 8)):  # a few distinct batches, cycled
        began = time.perf_counter()
        parts = [
            materialise(rows, dataset, m.null_class)
            for rows in micro_batches(draw_step(spec, order, k), s.batch_size)
        ]
        data_s.append(time.perf_counter() - began)
        batches.append([part.to(device) for part in parts])
    step = trainer_step(
        FastTrainingDiT.from_model(initial_model(resolved, None)).to(device),
        StepRecipe.of(s),
        lr=s.lr,
        autocast=torch.bfloat16 if resolve_dtype(None, device) == torch.bfloat16 else None,
    )
    windows = []
    for start in range(0, s.steps, s.log_every):
        began = time.perf_counter()
        for k in range(start, min(start + s.log_every, s.steps)):
            step(batches[k % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        windows.append((time.perf_counter() - began) / (min(start + s.log_every, s.steps) - start))
    return windows[1:] or windows, data_s


def loop_windows(config: TrainConfig) -> dict[str, list[float]]:
    """Of ``selfflow train``'s logged windows (the first left out): seconds per step
    (``loop_s``) and the share spent waiting for batches (``data_wait``); and the seconds of
    each checkpoint it wrote (``checkpoint_s``: model, EMA, AdamW state and the EMA export)."""
    train(config, log=lambda _: None)
    records = [json.loads(line) for line in (Path(config.output_dir) / "log.jsonl").open()]
    windows = [r for r in records if "kind" not in r]
    windows = windows[1:] or windows
    return {
        "loop_s": [1.0 / r["steps_per_s"] for r in windows],
        "data_wait": [r["data_wait"] for r in windows],
        "checkpoint_s": [r["seconds"] for r in records if r.get("kind") == "checkpoint"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a preset such as XL/2")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if any)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each run")
    parser.add_argument("--batch", type=int, default=64, help="global batch (one process)")
    parser.add_argument("--log-every", type=int, default=None, help="window (default steps/5)")
    parser.add_argument("--images", type=int, default=2048, help="images in the dataset")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    args.log_every = args.log_every or max(1, args.steps // 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    record = {"model": args.model, "batch": args.batch, "steps": args.steps,
              "log_every": args.log_every, "device": name}  # fmt: skip

    def save() -> None:
        """After each run, so a time limit hit in the loop keeps the bare figures."""
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))

    print(f"{args.model}, global batch {args.batch}, {args.steps} steps in windows of "
          f"{args.log_every}, {device.type} ({name})")  # fmt: skip
    print("| run | ms per step (median window) |\n|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            data=str(Path(tmp) / "data"), output_dir=str(Path(tmp) / "run"), steps=args.steps,
            model=args.model, global_batch_size=args.batch, checkpoint_every=args.steps,
            sample_every=0, log_every=args.log_every, progress=False, device=str(device),
        )  # fmt: skip
        size = 8 if args.model == "tiny" else 32  # ImageNet 256's SD-VAE latents: 32 × 32
        rng = np.random.default_rng(0)
        means = rng.standard_normal((args.images, 4, size, size), dtype=np.float32)
        write_dataset(
            config.data, means, np.arange(args.images) % 10, stds=np.full_like(means, 0.3)
        )
        record["bare_s"], record["data_s"] = bare_windows(config, Path(config.data), device)
        bare_s = statistics.median(record["bare_s"])
        print(f"| bare step (batches on the device beforehand) | {1000 * bare_s:.2f} |", flush=True)
        save()
        record.update(loop_windows(config))
    loop_s = statistics.median(record["loop_s"])
    record["ratio"] = loop_s / bare_s
    save()
    print(f"| selfflow train (data path, logs, prefetch) | {1000 * loop_s:.2f} |")
    print(f"\nloop / bare: {loop_s / bare_s:.3f}")
    data_s = statistics.median(record["data_s"])
    print(f"drawing and reading one step's batch on the host: {1000 * data_s:.2f} ms (median "
          f"of {len(record['data_s'])}; the trainer does it on its prefetch thread); the loop "
          f"waited for its batches {100 * statistics.median(record['data_wait']):.1f} % of "
          f"the time (median window)")  # fmt: skip
    for seconds in record["checkpoint_s"]:
        every = TrainConfig.checkpoint_every
        print(f"one checkpoint (model, EMA, AdamW state, EMA export): {seconds:.2f} s, "
              f"{100 * seconds / (every * loop_s):.3f} % of the steps between two at the "
              f"default --checkpoint-every {every}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
