"""A sweep's results: ``results.csv``, ``results.json``, ``results.md`` and ``fid.png``.

They are rebuilt from every cell record in the sweep folder (``SWEEP/*/sweep_N.json``), never
appended to, so a rerun with more values adds rows and redraws, and a killed sweep leaves
results for the cells it finished. The plot is what a person reads at a glance: FID against
the guidance scale, one line per interval (and mode, steps, EMA length, checkpoint and N, when
the sweep varies them), the best cell starred. matplotlib draws it through its Agg canvas,
without pyplot, so no global backend is changed in the caller's process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfflow.base.files import atomic_write
from selfflow.research.plan import RECORD_GLOB, read_record

COLUMNS = (
    "cell",
    "checkpoint",
    "checkpoint_sha256",
    "ema_length",
    "cfg_scale",
    "guidance_interval",
    "mode",
    "num_steps",
    "num_samples",
    "seed",
    "fid",
    "sfid",
    "inception_score",
    "precision",
    "recall",
    "seconds",
    "sampled_images",
    "images_per_second",
    "processes",
    "finished",
)
# What a line of the plot is, beside the guidance interval: the other axes of a sweep.
LINE_KEYS = ("checkpoint", "ema_length", "mode", "num_steps", "num_samples")
FILES = ("results.csv", "results.json", "results.md", "fid.png")


def read_rows(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every cell record's row in ``folder``, ordered by cell name and N."""
    rows = []
    for path in sorted(Path(folder).glob(f"*/{RECORD_GLOB}")):
        record = read_record(path)
        if record is not None and isinstance(record.get("row"), dict):
            rows.append(record["row"])
    return sorted(rows, key=lambda row: (row["cell"], row["num_samples"]))


def _fid_key(row: dict[str, Any]) -> tuple[bool, float]:
    fid = row.get("fid")
    finite = fid is not None and math.isfinite(fid)
    return (not finite, fid if finite else 0.0)  # a missing or infinite FID is the worst


def by_fid(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (lowest FID) first; a cell without a finite FID last."""
    return sorted(rows, key=_fid_key)


def number_text(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def describe(row: dict[str, Any]) -> str:
    """One line: the numbers, then the cell's settings."""
    guidance = (
        f"cfg {row['cfg_scale']:g} on tau {row['guidance_interval']}"
        if row["guidance_interval"]
        else f"cfg {row['cfg_scale']:g}"
    )
    ema = "" if row.get("ema_length") is None else f", EMA {row['ema_length']:g}"
    return (
        f"FID {number_text(row['fid'])}  sFID {number_text(row['sfid'])}  IS {number_text(row['inception_score'])}  "
        f"P {number_text(row['precision'], 3)}  R {number_text(row['recall'], 3)}  |  {guidance}, "
        f"{row['mode']} {row['num_steps']}{ema}, {Path(row['checkpoint']).name}, "
        f"N {row['num_samples']}"
    )


def summary_lines(rows: Sequence[dict[str, Any]], folder: str | os.PathLike) -> list[str]:
    """What the sweep prints at the end: every cell, worst first, and the best cell last."""
    if not rows:
        return ["no finished cells"]
    ranked = by_fid(rows)
    lines = [f"results: {Path(folder) / 'results.md'} and {Path(folder) / 'fid.png'}"]
    lines += [f"  {describe(row)}" for row in reversed(ranked[1:])]
    lines.append(f"best: {describe(ranked[0])}")
    return lines


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table sorted by FID, best first."""
    head = (
        "| # | FID | sFID | IS | Precision | Recall | cfg | interval | mode | steps | EMA "
        "| checkpoint | N | seed | seconds |"
    )
    lines = [
        "# Sweep results",
        "",
        "Sorted by FID (lower is better). Plot: [fid.png](fid.png); every column: results.csv.",
        "",
        head,
        "|" + "---|" * head.count(" | ") + "---|",
    ]
    for rank, row in enumerate(by_fid(rows), 1):
        cells = [
            str(rank),
            number_text(row["fid"]),
            number_text(row["sfid"]),
            number_text(row["inception_score"]),
            number_text(row["precision"], 3),
            number_text(row["recall"], 3),
            f"{row['cfg_scale']:g}",
            row["guidance_interval"] or "none",
            row["mode"],
            str(row["num_steps"]),
            number_text(row.get("ema_length")),
            f"`{Path(row['checkpoint']).name}`",
            str(row["num_samples"]),
            str(row["seed"]),
            f"{row['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in COLUMNS})
    return out.getvalue()


def plot_lines(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[tuple[float, float]]]:
    """(line key) → sorted (cfg, FID) points. A line is one interval at one value of each of
    :data:`LINE_KEYS`; the unguided cell (cfg 1.0, no interval) belongs to every interval's
    line of its other settings, as it is their common starting point."""
    lines: dict[tuple, dict[float, float]] = {}
    intervals = sorted({row["guidance_interval"] for row in rows if row["guidance_interval"]})
    for row in rows:
        if row.get("fid") is None or not math.isfinite(row["fid"]):
            continue
        others = tuple(row.get(key) for key in LINE_KEYS)
        for interval in [row["guidance_interval"]] if row["guidance_interval"] else intervals:
            lines.setdefault((interval, *others), {})[row["cfg_scale"]] = row["fid"]
        if not intervals:
            lines.setdefault(("", *others), {})[row["cfg_scale"]] = row["fid"]
    return {key: sorted(points.items()) for key, points in sorted(lines.items(), key=str)}


def _line_label(key: tuple, varying: list[int]) -> str:
    names = ("tau", "ckpt", "EMA", "", "steps", "N")
    parts = []
    for index in varying:
        value = key[index]
        if index == 1:
            value = Path(str(value)).name
        parts.append(f"{names[index]} {value}".strip())
    return ", ".join(parts) or "FID"


def plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """``fid.png``: FID against the guidance scale, a line per interval (and other axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = plot_lines(rows)
    keys = list(lines)
    varying = [i for i in range(len(keys[0]))] if keys else []
    varying = [i for i in varying if len({key[i] for key in keys}) > 1] or [0]
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in lines.items():
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=_line_label(key, varying))
    best = by_fid(rows)[0] if rows else None
    if best is not None and best.get("fid") is not None and math.isfinite(best["fid"]):
        axes.plot([best["cfg_scale"]], [best["fid"]], marker="*", markersize=16, color="gold",
                  markeredgecolor="black", linestyle="none", label=f"best: FID {best['fid']:.4g}")  # fmt: skip
    axes.set_xlabel("guidance scale (1 = none)")
    axes.set_ylabel("FID (lower is better)")
    n = sorted({row["num_samples"] for row in rows})
    axes.set_title(f"FID against guidance scale ({', '.join(map(str, n))} samples)")
    axes.grid(True, alpha=0.3)
    if lines:
        axes.legend(fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def write_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Rebuild the four result files from the folder's records; returns the rows."""
    folder = Path(folder)
    rows = read_rows(folder)
    text = json.dumps(rows, indent=2, allow_nan=False) + "\n"
    contents = {
        "results.csv": _csv_text(rows).encode(),
        "results.json": text.encode(),
        "results.md": markdown(rows).encode(),
        "fid.png": plot_png(rows),
    }
    for name, data in contents.items():
        atomic_write(folder / name, lambda handle, data=data: handle.write(data))
    return rows
