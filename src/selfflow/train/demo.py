"""It learns real data on a CPU: Self-Flow on scikit-learn's 8 × 8 digits, in minutes.

    python -m selfflow.train.demo --out digits_demo --steps 200 400 800

The 1 797 handwritten digits that ship inside scikit-learn (``load_digits``: 8 × 8 grey
levels 0–16, ten classes) are written with :func:`selfflow.data.write_dataset` as a 1 × 8 × 8
pixel dataset scaled to [-1, 1], and a small model is trained on them with ``selfflow train``'s
own code (:func:`selfflow.train.train`), resuming the same run to each step count in turn.
After each, the EMA samples 20 digits per class with the package's SDE sampler, and a logistic
regression fitted on the real digits names each sample's class: the accuracy says whether the
class-conditional samples look like their class (chance is 10 %). The untrained model (step 0)
is scored the same way, and ``--method flow`` (the SiT baseline) gets the same budget.

Settings that differ from the ImageNet recipe, because the run is a few hundred steps long: a
smaller model (width 64, 4 blocks), global batch 64, learning rate 3e-3 and EMA decay 0.99
(an EMA of 0.9999 would still be 95 % the initial weights after 500 steps).

Post-hoc EMA sweep (``--ema-sweep 0.02 0.05 0.1 0.2``): the run also keeps power-function
EMAs of σ_rel 0.05 and 0.10 (``--posthoc-ema``, a snapshot every twentieth of the longest
step count), and at its last step the EMA of each swept σ_rel is reconstructed from the
snapshots (:func:`selfflow.train.export_posthoc_ema`) and scored the same way: accuracy
against the EMA length, from one run. That run has its own folder (``METHOD-posthoc``): the
tracked EMAs are part of a run's identity, and they leave its weights as they are.

Needs scikit-learn (in selfflow's ``[test]`` extra), for the digits and the classifier.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfflow.base.errors import ConfigurationError, SelfFlowError

SAMPLES_PER_CLASS = 20
SAMPLER_STEPS = 100


@dataclass(frozen=True)
class DemoSettings:
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    global_batch_size: int = 64
    lr: float = 3e-3
    ema_decay: float = 0.99
    seed: int = 0


def write_digits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits as a pixel dataset in [-1, 1] (grey level / 8 − 1); returns (images, labels)."""
    from sklearn.datasets import load_digits

    from selfflow.data import write_dataset

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = digits.target.astype(np.int64)
    if not (folder / "manifest.json").exists():
        write_dataset(folder, images, labels, class_names=[str(i) for i in range(10)])
    return images, labels


def _features(images: np.ndarray) -> np.ndarray:
    """Images as the classifier's float64 rows (the digits' levels are exact in both dtypes)."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


def fit_classifier(images: np.ndarray, labels: np.ndarray):
    """A logistic regression fitted on all the real digits: 99.6 % training accuracy on them,
    92.5 % in scikit-learn's 5-fold cross-validation (``cross_val_score``, unshuffled folds).

    Fitted in float64 on one BLAS thread, so that its coefficients do not depend on how many
    threads OpenBLAS starts (the machine's core count, ``OMP_NUM_THREADS``): fitted in float32
    with the threads left free, 1 and 2 threads gave coefficients up to 0.011 apart, and the
    untrained model's score moved from 15.0 % to 15.5 % (one sample in 200).
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return LogisticRegression(max_iter=2000).fit(_features(images), labels)


def sample_digits(model, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``SAMPLES_PER_CLASS`` samples of each class from ``model`` with the package's SDE."""
    from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline

    labels = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    pipe = SelfFlowPipeline(model.eval())
    latents = pipe.sample_latents(
        labels,
        list(range(len(labels))),
        seed,
        SamplerSettings(num_steps=SAMPLER_STEPS, mode="sde"),
    )
    return latents.clamp(-1, 1).numpy(), labels.numpy()


def accuracy(classifier, model, seed: int) -> float:
    from threadpoolctl import threadpool_limits

    samples, labels = sample_digits(model, seed)
    with threadpool_limits(1, user_api="blas"):  # as it was fitted: one BLAS thread
        predicted = classifier.predict(_features(samples))
    return float((predicted == labels).mean())


def run_method(
    method: str,
    data: Path,
    out: Path,
    steps: Sequence[int],
    classifier,
    demo: DemoSettings,
    posthoc: Sequence[float] = (),
    extra: Callable[[torch.nn.Module], dict] | None = None,
) -> list[dict]:
    """Train one run up to each step count in turn (resuming) and score its EMA each time;
    with ``posthoc``, the run (folder ``METHOD-posthoc``) also tracks those σ_rel.

    ``extra(model)``, when given, adds its entries to each row (the representation probe of
    ``python -m selfflow.research.digits``)."""
    from selfflow.model.checkpoint import load_model
    from selfflow.train import TrainConfig, train
    from selfflow.train.state import export_path
    from selfflow.train.weights import initial_model

    folder = out / (f"{method}-posthoc" if posthoc else method)
    config = TrainConfig(
        data=str(data),
        output_dir=str(folder),
        steps=1,
        model="tiny",
        hidden_size=demo.hidden_size,
        depth=demo.depth,
        num_heads=demo.num_heads,
        global_batch_size=demo.global_batch_size,
        lr=demo.lr,
        ema_decay=demo.ema_decay,
        method=method,
        seed=demo.seed,
        device="cpu",
        checkpoint_every=max(steps),
        sample_every=0,
        log_every=50,
        progress=False,
        posthoc_ema=tuple(posthoc),
        snapshot_every=max(1, max(steps) // 20) if posthoc else None,
    )
    untrained = initial_model(config.resolve((1, 8, 8), 10), None)  # the run's step-0 weights
    rows = [{"method": method, "step": 0, "accuracy": accuracy(classifier, untrained, 1)}]
    rows[0].update(extra(untrained) if extra is not None else {})
    trained = 0.0  # seconds inside train() only: the scoring between the runs is left out
    for count in steps:
        began = time.perf_counter()
        train(TrainConfig(**{**config.__dict__, "steps": count}), log=lambda _: None)
        trained += time.perf_counter() - began
        model = load_model(export_path(folder, count))
        rows.append(
            {
                "method": method,
                "step": count,
                "accuracy": accuracy(classifier, model, 1),
                "train_seconds": round(trained, 1),
                **(extra(model) if extra is not None else {}),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def posthoc_sweep(method: str, run: Path, lengths: Sequence[float], classifier) -> list[dict]:
    """At the run's last snapshot, the EMA of each σ_rel in ``lengths`` reconstructed from the
    tracked ones, scored like the recipe's EMA (with the profile's residual beside it)."""
    from selfflow.model.checkpoint import load_model
    from selfflow.train import export_posthoc_ema

    rows = []
    for sigma_rel in lengths:
        exported = export_posthoc_ema(run, sigma_rel, run / f"posthoc_{sigma_rel:g}.pt")
        rows.append(
            {
                "method": method,
                "step": exported.step,
                "ema_length": sigma_rel,
                "residual": round(exported.residual, 5),
                "accuracy": accuracy(classifier, load_model(exported.path), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _print_tables(rows: list[dict], sweep: list[dict]) -> None:
    print("\n| method | step | accuracy |\n|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['step']} | {row['accuracy']:.1%} |")
    if sweep:
        print("\n| method | step | post-hoc EMA σ_rel | profile residual | accuracy |")
        print("|---|---|---|---|---|")
        for row in sweep:
            print(
                f"| {row['method']} | {row['step']} | {row['ema_length']:g} | "
                f"{row['residual']:.2%} | {row['accuracy']:.1%} |"
            )


METHODS = ("selfflow", "flow", "dual")


def check_options(args: argparse.Namespace) -> None:
    """The demo's numbers, before the digits are written or any step is trained: one line
    naming the demo's own option (the trainer's would name options the demo does not have).
    Also checked for ``python -m selfflow.research.digits``, which takes the same ones."""
    from selfflow.base.files import check_can_write
    from selfflow.train.config import check_posthoc_options
    from selfflow.train.phema import check_sigma_rel

    for name, values in (("--steps", args.steps), ("--threads", [args.threads])):
        for value in values:
            if value < 1:
                raise ConfigurationError(f"{name} must be at least 1; got {value}")
    check_posthoc_options(list(getattr(args, "posthoc_ema", None) or ()), None)
    for value in getattr(args, "ema_sweep", None) or ():
        check_sigma_rel(value, "--ema-sweep")
    check_can_write(args.out, f"--out {args.out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m selfflow.train.demo",
        description="Train Self-Flow and the SiT baseline on scikit-learn's 8x8 digits on the "
        "CPU; a classifier fitted on real digits scores the class-conditional samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("digits_demo"), help="work folder")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[200, 400, 800], help="step counts to score"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["selfflow", "flow"], choices=METHODS,
        help="training objectives: Self-Flow, the SiT baseline (flow), or both losses (dual)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: these matmuls are too small to gain from more, and on a "
        "busy machine several threads slow each other down many times over)",
    )
    parser.add_argument(
        "--ema-sweep",
        type=float,
        nargs="+",
        default=None,
        metavar="SIGMA_REL",
        help="post-hoc EMA sweep: the runs also track --posthoc-ema, and at the last step the "
        "EMA of each of these σ_rel is reconstructed and scored (None: no sweep)",
    )
    parser.add_argument(
        "--posthoc-ema",
        type=float,
        nargs="+",
        default=[0.05, 0.10],
        metavar="SIGMA_REL",
        help="the σ_rel the sweep's runs track (as EDM2)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SelfFlowError as error:  # one line, as the selfflow command prints it
        parser.exit(1, f"{parser.prog}: error: {error}\n")


def _run(args: argparse.Namespace) -> int:
    check_options(args)
    torch.set_num_threads(args.threads)
    images, labels = write_digits(args.out / "data")
    classifier = fit_classifier(images, labels)
    posthoc = tuple(args.posthoc_ema) if args.ema_sweep else ()
    steps = sorted(set(args.steps))
    rows, sweep = [], []
    for method in dict.fromkeys(args.methods):
        rows += run_method(method, args.out / "data", args.out, steps, classifier,
                           DemoSettings(), posthoc)  # fmt: skip
        if args.ema_sweep:
            run = args.out / f"{method}-posthoc"
            sweep += posthoc_sweep(method, run, sorted(set(args.ema_sweep)), classifier)
    _print_tables(rows, sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
