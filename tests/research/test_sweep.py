"""`selfflow sweep` end to end on the tiny model, the tiny VAE and a small Inception-shaped
graph (CPU): the cells are ordinary FID batches, so each is checked against `selfflow sample`
and `selfflow evaluate` run by hand, against a rerun, a killed run and two processes.

Eight images of two sampler steps per cell keep a cell at a few seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfflow import cli
from selfflow.base.files import file_sha256
from selfflow.batch import runner
from selfflow.eval import evaluator
from selfflow.model.checkpoint import save_model
from selfflow.model.network import ModelConfig, SelfFlowDiT
from tests.conftest import randomize_

N = 8
REAL_BATCH = runner.generate_fid_batch


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> dict[str, str]:
    """Two checkpoints of one model, the tiny VAE, ADM's files' stand-ins, a private cache."""
    from selfflow.eval.synthetic import inception_like_graph

    folder = tmp_path_factory.mktemp("inputs")
    second = folder / "step_2.pt"
    save_model(randomize_(SelfFlowDiT(ModelConfig.tiny()), seed=8, gain=0.5), second)
    first = folder / "step_1.pt"
    shutil.copy(tiny_checkpoint, first)
    graph = folder / "graph.pb"
    graph.write_bytes(
        inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    )
    ref = folder / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), np.uint8))
    return {"a": str(first), "b": str(second), "vae": tiny_vae_dir, "graph": str(graph),
            "ref": str(ref), "cache": str(folder / "cache")}  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(inputs, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", inputs["cache"])


def sweep_args(inputs, out, *extra, ckpts=("a", "b"), cfg=("1.5", "2.0")) -> list[str]:
    return [
        "sweep", "--ckpt", *(inputs[k] for k in ckpts), "--cfg-scale", *cfg,
        "--guidance-interval", "0.0:0.7", "--vae", inputs["vae"], "--inception", inputs["graph"],
        "--eval-ref", inputs["ref"], "--output-dir", str(out), "--num-fid-samples", str(N),
        "--batch-size", "4", "--num-steps", "2", "--device", "cpu", *extra,
    ]  # fmt: skip


class Calls:
    """Wraps ``generate_fid_batch``: the cell folders it was called for; optionally raises
    before the call number ``fail_at`` (1-based), as a kill between cells would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.folders: list[str] = []
        self.fail_at = fail_at

    def __call__(self, config, **kwargs):
        if self.fail_at is not None and len(self.folders) + 1 == self.fail_at:
            raise RuntimeError("killed between cells")
        self.folders.append(Path(config.output_dir).name)
        return REAL_BATCH(config, **kwargs)


def run(args, capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def rows(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.glob("*/*") if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory, inputs) -> tuple[Path, str, list[str]]:
    """The 2 × 2 sweep (two checkpoints × two guidance scales), counting the reference
    feature computations of the evaluator."""
    out = tmp_path_factory.mktemp("sweep") / "SWEEP"
    computed: list[str] = []
    real = evaluator.compute_activations

    def counting(model, images, batch_size, what, progress):
        computed.append(what)
        return real(model, images, batch_size, what, progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SELFFLOW_CACHE", inputs["cache"])
        patch.setattr(evaluator, "compute_activations", counting)
        import io
        from contextlib import redirect_stdout

        printed = io.StringIO()
        with redirect_stdout(printed):
            assert cli.main(sweep_args(inputs, out)) == 0
    return out, printed.getvalue(), computed


# -- what a sweep writes --------------------------------------------------------------------------


def test_a_2x2_sweep_writes_four_rows_the_table_and_the_plot(swept, inputs):
    out, printed, _ = swept
    found = rows(out)
    assert len(found) == 4
    assert {(Path(r["checkpoint"]).name, r["cfg_scale"]) for r in found} == {
        ("step_1.pt", 1.5), ("step_1.pt", 2.0), ("step_2.pt", 1.5), ("step_2.pt", 2.0),
    }  # fmt: skip
    for row in found:
        assert row["checkpoint_sha256"] == file_sha256(inputs[{"step_1.pt": "a", "step_2.pt": "b"}[
            Path(row["checkpoint"]).name]])  # fmt: skip
        assert (row["guidance_interval"], row["mode"], row["num_steps"]) == ("0.0:0.7", "SDE", 2)
        assert (row["num_samples"], row["seed"], row["ema_length"]) == (N, 31, None)
        # the row's numbers are the evaluator's, as it wrote them into the cell's folder
        metrics = json.loads((out / row["cell"] / "metrics.json").read_text())
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert row[key] == metrics[key]
        assert row["seconds"] > 0 and row["sampled_images"] == N
    # the csv holds the same rows
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["cell"], float(r["fid"])) for r in table] == [(r["cell"], r["fid"]) for r in found]
    # the markdown table is sorted by FID, best first
    lines = [line for line in (out / "results.md").read_text().splitlines() if line[:3] == "| 1"
             or line[:2] == "| " and line[2].isdigit()]  # fmt: skip
    assert len(lines) == 4
    fids = [float(line.split("|")[2]) for line in lines]
    assert fids == sorted(fids)
    # the plot is a real PNG with something drawn on it
    with Image.open(out / "fid.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert len(np.unique(np.asarray(image.convert("L")))) > 10
    # the best cell is the last line printed
    best = min(found, key=lambda r: r["fid"])
    last = printed.strip().splitlines()[-1]
    assert last.startswith("best: ") and f"cfg {best['cfg_scale']:g}" in last
    assert Path(best["checkpoint"]).name in last


def test_the_reference_features_are_computed_once_for_all_cells(swept):
    _, _, computed = swept
    assert computed.count("reference") == 1
    assert computed.count("samples") == 4


def test_a_cells_npz_and_numbers_equal_sample_and_evaluate_run_by_hand(
    swept, inputs, tmp_path, capsys
):
    out, _, _ = swept
    (row,) = [r for r in rows(out) if r["cell"] == "step_2_cfg2.0_tau0.0-0.7_sde2"]
    by_hand = tmp_path / "by_hand"
    code, _, err = run(
        ["sample", "--ckpt", inputs["b"], "--vae", inputs["vae"], "--output-dir", str(by_hand),
         "--num-fid-samples", str(N), "--batch-size", "4", "--num-steps", "2",
         "--cfg-scale", "2.0", "--guidance-low", "0.0", "--guidance-high", "0.7",
         "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    npz = f"samples_{N}.npz"
    assert (by_hand / npz).read_bytes() == (out / row["cell"] / npz).read_bytes()
    code, printed, err = run(
        ["evaluate", inputs["ref"], str(by_hand / npz), str(tmp_path / "eval"),
         "--inception", inputs["graph"], "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    adm = dict(line.split(": ") for line in printed.strip().splitlines()[-5:])
    assert float(adm["FID"]) == row["fid"] and float(adm["sFID"]) == row["sfid"]
    assert float(adm["Inception Score"]) == row["inception_score"]
    assert (float(adm["Precision"]), float(adm["Recall"])) == (row["precision"], row["recall"])


# -- reruns, more values, a killed sweep ----------------------------------------------------------


def test_a_rerun_samples_nothing_and_more_values_add_rows(swept, inputs, tmp_path, monkeypatch,
                                                           capsys):  # fmt: skip
    out = tmp_path / "SWEEP"
    shutil.copytree(swept[0], out)
    before, old_rows = mtimes(out), rows(out)
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    code, printed, err = run(sweep_args(inputs, out), capsys)
    assert code == 0, err
    assert calls.folders == [] and mtimes(out) == before
    assert rows(out) == old_rows and printed.strip().splitlines()[-1].startswith("best: ")
    # one more scale for one checkpoint: only its cell is sampled, and the results gain its row
    code, _, err = run(sweep_args(inputs, out, ckpts=("a",), cfg=("1.5", "2.0", "3.0")), capsys)
    assert code == 0, err
    assert calls.folders == ["step_1_cfg3.0_tau0.0-0.7_sde2"]
    assert len(rows(out)) == 5 and {r["cell"]: r for r in rows(out)}.items() >= {
        r["cell"]: r for r in old_rows}.items()  # fmt: skip
    assert all(before[k] == v for k, v in mtimes(out).items() if k in before and k.endswith(".npz"))


def test_a_killed_sweep_resumes_without_sampling_its_finished_cells_again(
    inputs, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "SWEEP"
    monkeypatch.setattr(runner, "generate_fid_batch", Calls(fail_at=2))
    with pytest.raises(RuntimeError, match="killed between cells"):
        cli.main(sweep_args(inputs, out, ckpts=("a",)))
    capsys.readouterr()
    (first,) = rows(out)  # the results of the cell it finished are written already
    npz = out / first["cell"] / f"samples_{N}.npz"
    stamp = npz.stat().st_mtime_ns
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    code, _, err = run(sweep_args(inputs, out, ckpts=("a",)), capsys)
    assert code == 0, err
    assert first["cell"] not in calls.folders and len(calls.folders) == 1
    assert len(rows(out)) == 2 and rows(out)[0] == first and npz.stat().st_mtime_ns == stamp


# -- the dry run ------------------------------------------------------------------------------------


def test_the_dry_run_lists_the_cells_and_estimates_from_the_first_cells_rate(
    swept, inputs, tmp_path, monkeypatch, capsys
):
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    # before any cell has run: the time is unknown, and nothing is written
    fresh = tmp_path / "fresh"
    code, printed, err = run(sweep_args(inputs, fresh, "--dry-run"), capsys)
    assert code == 0, err
    assert "4 cells" in printed and f"images to sample: {4 * N}" in printed
    assert "unknown until the first cell has run" in printed and not fresh.exists()
    # a finished sweep with a third checkpoint added: its two cells cost what the first
    # finished cell cost per image (same steps, scale, interval), so twice N images at its rate
    out = tmp_path / "SWEEP"
    shutil.copytree(swept[0], out)
    third = tmp_path / "step_3.pt"
    shutil.copy(inputs["b"], third)
    before = mtimes(out)
    args = sweep_args({**inputs, "c": str(third)}, out, "--dry-run", ckpts=("a", "b", "c"))
    code, printed, err = run(args, capsys)
    assert code == 0, err
    assert calls.folders == [] and mtimes(out) == before
    lines = printed.splitlines()
    assert sum("finished: FID" in line for line in lines) == 4
    assert sum(line.endswith("to run") for line in lines) == 2
    assert f"images to sample: {2 * N}" in printed
    first = min(rows(out), key=lambda r: r["finished"])
    expected = round(2 * N / first["images_per_second"])
    (time_line,) = [line for line in lines if line.startswith("time: ")]
    assert f"about {expected} s of sampling at the rate of {first['cell']}" in time_line


# -- post-hoc EMA: the seam to the trainer's export ------------------------------------------------


def test_ema_lengths_sample_what_the_run_folders_export_gives(inputs, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    """A stand-in for ``selfflow.train.export_posthoc_ema`` writes a different model per σ_rel;
    each cell samples the file exported for its σ_rel, and a rerun exports nothing again."""
    import selfflow.train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    exported: list[tuple] = []

    def export_posthoc_ema(run, sigma_rel, out_path, step=None):
        exported.append((Path(run), sigma_rel, Path(out_path).name, step))
        model = randomize_(SelfFlowDiT(ModelConfig.tiny()), seed=int(sigma_rel * 100), gain=0.5)
        save_model(model, out_path)

    monkeypatch.setattr(selfflow.train, "export_posthoc_ema", export_posthoc_ema, raising=False)
    args = ["sweep", "--ckpt", str(run_dir), "--ema-length", "0.05", "0.1", "--vae",
            inputs["vae"], "--inception", inputs["graph"], "--eval-ref", inputs["ref"],
            "--output-dir", str(tmp_path / "SWEEP"), "--num-fid-samples", str(N),
            "--batch-size", "4", "--num-steps", "2", "--device", "cpu"]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert [(run, sigma, step) for run, sigma, _, step in exported] == [
        (run_dir, 0.05, None), (run_dir, 0.1, None),
    ]  # fmt: skip
    found = {row["ema_length"]: row for row in rows(tmp_path / "SWEEP")}
    assert set(found) == {0.05, 0.1}
    for sigma, row in found.items():
        (name,) = [name for _, s, name, _ in exported if s == sigma]
        assert row["checkpoint_sha256"] == file_sha256(tmp_path / "SWEEP" / "ema" / name)
        assert row["checkpoint"] == str(run_dir)
    assert found[0.05]["fid"] != found[0.1]["fid"]  # two models, two batches
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert len(exported) == 2


# -- checks before any work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, i, t: a + ["--ema-length", "0.05"], "is a file"),
        (lambda a, i, t: [str(t) if x == i["a"] else x for x in a], "needs --ema-length"),
        (lambda a, i, t: [str(t / "no.pt") if x == i["a"] else x for x in a], "no such file"),
        (lambda a, i, t: [str(t / "no.npz") if x == i["ref"] else x for x in a], "no such file"),
        (lambda a, i, t: a + ["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
        (lambda a, i, t: a + ["--guidance-low", "0.1"], "--guidance-interval"),
        (lambda a, i, t: a + ["--overwrite"], "finished cells are kept"),
        (lambda a, i, t: a + ["--num-fid-samples", "0"], "--num-fid-samples must be"),
        (lambda a, i, t: a + ["--mode", "ODE", "--num-steps", "1"], "--num-steps must be"),
    ],
)
def test_bad_settings_are_refused_before_any_cell(
    inputs, tmp_path, monkeypatch, capsys, change, message
):
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    out = tmp_path / "SWEEP"
    code, _, err = run(change(sweep_args(inputs, out), inputs, tmp_path), capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert calls.folders == [] and not out.exists()


@pytest.mark.parametrize("interval", ["0.7:0.2", "0.5", "0:1.5", "a:b", "0.3:0.3"])
def test_a_guidance_interval_must_be_low_colon_high_within_zero_and_one(
    inputs, tmp_path, capsys, interval
):
    args = sweep_args(inputs, tmp_path / "SWEEP")
    args[args.index("--guidance-interval") + 1] = interval
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2 and "--guidance-interval" in capsys.readouterr().err


def test_post_hoc_ema_without_the_trainers_export_is_refused_before_any_cell(
    inputs, tmp_path, monkeypatch, capsys
):
    import selfflow.train

    monkeypatch.delattr(selfflow.train, "export_posthoc_ema", raising=False)
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    args = sweep_args(inputs, tmp_path / "SWEEP", ckpts=())
    args[args.index("--ckpt") + 1 : args.index("--ckpt") + 1] = [
        str(tmp_path),
        "--ema-length",
        "0.1",
    ]
    code, _, err = run(args, capsys)
    assert code == 1 and "post-hoc EMA export" in err and calls.folders == []


def test_a_cell_sampled_with_other_settings_is_refused_before_any_sampling(
    swept, inputs, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "SWEEP"
    shutil.copytree(swept[0], out)
    calls = Calls()
    monkeypatch.setattr(runner, "generate_fid_batch", calls)
    code, _, err = run(sweep_args(inputs, out, "--seed", "5", cfg=("1.5", "2.0", "3.0")), capsys)
    assert code == 1 and "seed 31 there, 5 now" in err and calls.folders == []


# -- one process or two ------------------------------------------------------------------------------


@pytest.mark.slow  # two torchrun processes start, load and sample four cells: about a minute
def test_two_processes_give_the_results_of_one(swept, inputs, tmp_path):
    out = tmp_path / "SWEEP"
    import torch

    # rank 0 evaluates with the threads the one-process run had (float32 sums round per split)
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "SELFFLOW_CACHE": inputs["cache"]}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "selfflow.cli", *sweep_args(inputs, out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = rows(swept[0]), rows(out)
    for row in one:
        npz = f"{row['cell']}/samples_{N}.npz"
        assert (out / npz).read_bytes() == (swept[0] / npz).read_bytes()
    assert [r["processes"] for r in two] == [2] * 4
    keys = ("cell", "checkpoint_sha256", "fid", "sfid", "inception_score", "precision", "recall")
    assert [{k: r[k] for k in keys} for r in two] == [{k: r[k] for k in keys} for r in one]
    assert done.stdout.strip().splitlines()[-1].startswith("best: ")


# -- the cells and the plot's lines, without sampling ---------------------------------------------


def test_the_unguided_scale_is_one_cell_and_starts_every_intervals_line(inputs, tmp_path):
    from selfflow.batch import BatchConfig
    from selfflow.research.plan import SweepConfig, make_cells
    from selfflow.research.results import plot_lines

    config = SweepConfig(
        checkpoints=[inputs["a"]],
        output_dir=tmp_path,
        base=BatchConfig(eval_ref=inputs["ref"]),
        cfg_scales=[1.0, 1.5, 2.0],
        intervals=[(0.0, 0.7), (0.0, 1.0)],
    )
    cells = make_cells(config)
    assert [(c.cfg_scale, c.interval) for c in cells] == [
        (1.0, None), (1.5, (0.0, 0.7)), (1.5, (0.0, 1.0)), (2.0, (0.0, 0.7)), (2.0, (0.0, 1.0)),
    ]  # fmt: skip
    assert len({c.name for c in cells}) == 5 and all(c.num_steps == 250 for c in cells)
    fid = {(1.0, ""): 9.0, (1.5, "0.0:0.7"): 7.0, (1.5, "0.0:1.0"): 8.0, (2.0, "0.0:0.7"): 6.0,
           (2.0, "0.0:1.0"): 10.0}  # fmt: skip
    rows = [{"checkpoint": "a.pt", "ema_length": None, "mode": "SDE", "num_steps": 250,
             "num_samples": N, "cfg_scale": cfg, "guidance_interval": interval, "fid": value}
            for (cfg, interval), value in fid.items()]  # fmt: skip
    lines = {key[0]: points for key, points in plot_lines(rows).items()}
    assert lines == {
        "0.0:0.7": [(1.0, 9.0), (1.5, 7.0), (2.0, 6.0)],
        "0.0:1.0": [(1.0, 9.0), (1.5, 8.0), (2.0, 10.0)],
    }
