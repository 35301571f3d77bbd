"""The digits demo with the representation probe, over several training seeds.

    python -m selfflow.research.digits --out digits_probe --seeds 0 1 2 --steps 300 600

:mod:`selfflow.train.demo` trains Self-Flow and the SiT baseline (``--method flow``) on
scikit-learn's 8 × 8 digits and scores the class-conditional samples with a classifier fitted
on the real digits. This runs the same demo once per training seed and also probes each scored
model (:mod:`selfflow.research.probe`): the null-label features of the chosen blocks at the
chosen noise levels, a logistic regression fitted on 80 % of the digits (a split keyed by
probe seed 0, the same for every run) and scored on the other 20 %. The table gives, per
method and step count, the mean and the range (min to max) over the seeds.

The diffusion model is trained on every digit, the probe's test rows included: the probe's
held-out rows are held out from the probe's classifier only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from selfflow.base.errors import ConfigurationError, SelfFlowError
from selfflow.data import LatentDataset
from selfflow.research.probe import run_probe, split_rows
from selfflow.train import demo

PROBE_SEED = 0  # one split and one set of noises for every run: only the model differs
DEFAULT_LAYERS = (1, 2, 4)
DEFAULT_TAUS = (0.3, 0.7)


def cell_name(layer: int, tau: float) -> str:
    return f"probe L{layer} tau {tau:g}"


def probe_scorer(
    data: Path, layers: Sequence[int], taus: Sequence[float]
) -> Callable[[torch.nn.Module], dict]:
    """``model -> {cell_name: test accuracy}`` on the digits, the demo's ``extra`` scorer."""
    dataset = LatentDataset(data)
    train_rows, test_rows = split_rows(len(dataset), 0.2, PROBE_SEED)

    def score(model: torch.nn.Module) -> dict:
        results = run_probe(
            model.eval(),
            dataset,
            layers,
            taus,
            seed=PROBE_SEED,
            train_rows=train_rows,
            test_rows=test_rows,
        )
        return {cell_name(r.layer, r.tau): r.accuracy for r in results}

    return score


def logged_rows(logs: Sequence[Path]) -> list[dict]:
    """The rows that runs of this command printed (``seed row: {...}`` lines) in ``logs``;
    a log that is missing or holds none is one line naming it."""
    prefix = "seed row: "
    rows = []
    for log in logs:
        try:
            lines = Path(log).read_text(errors="replace").splitlines()
        except OSError as error:
            raise ConfigurationError(
                f"--summarise {log}: cannot be read ({error.strerror or error})"
            ) from None
        found = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
        if not found:
            raise ConfigurationError(
                f"--summarise {log}: no digits probe records found in it (expected lines "
                f"starting {prefix!r}, as python -m selfflow.research.digits prints them)"
            )
        for text in found:
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError:
                raise ConfigurationError(
                    f"--summarise {log}: a {prefix!r} line is not a record: {text[:60]!r}"
                ) from None
    return rows


def summary_table(rows: list[dict], cells: Sequence[str]) -> str:
    """Mean and range over the seeds of each method's sample accuracy and probe cells."""
    keys = ["accuracy", *cells]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["step"]), []).append(row)
    header = ["method", "step", "seeds", "sample accuracy", *cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, step), group in groups.items():
        seeds = ",".join(str(row["seed"]) for row in group)
        shown = []
        for key in keys:
            values = [100.0 * row[key] for row in group]
            mean = sum(values) / len(values)
            shown.append(f"{mean:.1f} % ({min(values):.1f}–{max(values):.1f})")
        lines.append(f"| {method} | {step} | {seeds} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m selfflow.research.digits",
        description="The digits demo (python -m selfflow.train.demo) over several training "
        "seeds, with the representation probe of each scored model beside its sample "
        "accuracy: mean and range (min-max) over the seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("digits_probe"), help="work folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[300, 600], help="step counts to score"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["selfflow", "flow"], choices=demo.METHODS,
        help="training objectives, as the demo's",
    )  # fmt: skip
    parser.add_argument(
        "--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS),
        help=f"1-based blocks to probe (the demo's model has {demo.DemoSettings().depth})",
    )  # fmt: skip
    parser.add_argument(
        "--taus", type=float, nargs="+", default=list(DEFAULT_TAUS),
        help="noise levels to probe at, strictly inside (0, 1): 1 = pure noise",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        default=None,
        metavar="LOG",
        help="train nothing: print the table of the runs recorded in these logs (this "
        "command's output, e.g. seeds run in separate processes)",
    )
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Every option before the digits are written or any step is trained (one line each);
    repeated values are dropped, keeping their order."""
    from selfflow.research.probe import check_cells

    for name in ("seeds", "methods", "layers", "taus"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    demo.check_options(args)
    for seed in args.seeds:
        if seed < 0:
            raise ConfigurationError(f"--seeds must be whole numbers >= 0; got {seed}")
    check_cells(demo.DemoSettings().depth, args.layers, args.taus, "--layers", "--taus")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.summarise is not None:
            rows = logged_rows(args.summarise)
            cells = sorted({key for row in rows for key in row if key.startswith("probe ")})
            rows.sort(key=lambda row: (row["method"] != "selfflow", row["step"], row["seed"]))
            print(summary_table(rows, cells), flush=True)
            return 0
        check_options(args)
        return _run(args)
    except SelfFlowError as error:  # one line, as the selfflow command prints it
        parser.exit(1, f"{parser.prog}: error: {error}\n")


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    images, labels = demo.write_digits(args.out / "data")
    classifier = demo.fit_classifier(images, labels)
    score = probe_scorer(args.out / "data", args.layers, args.taus)
    cells = [cell_name(layer, tau) for layer in args.layers for tau in args.taus]
    rows = []
    for seed in args.seeds:
        settings = demo.DemoSettings(seed=seed)
        for method in args.methods:
            found = demo.run_method(
                method,
                args.out / "data",
                args.out / f"seed{seed}",
                sorted(set(args.steps)),
                classifier,
                settings,
                extra=score,
            )
            rows += [{**row, "seed": seed} for row in found]
            for row in rows[-len(found) :]:
                print("seed row: " + json.dumps(row), flush=True)
    rows.sort(key=lambda row: (args.methods.index(row["method"]), row["step"], row["seed"]))
    print("\n" + summary_table(rows, cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
