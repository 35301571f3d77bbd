"""``python -m selfflow.research.digits``: every option is checked before the digits are written
or a step is trained (one line naming this command's own options), ``--summarise`` reads only
logs that hold its records, and ``--help`` shows the defaults."""

from __future__ import annotations

import json

import pytest

from selfflow.research import digits
from selfflow.train import demo

PROG = "python -m selfflow.research.digits"


@pytest.fixture
def no_work(monkeypatch):
    """Any step of the real work fails the test: the checks must come first."""

    def fail(*_args, **_kwargs):
        raise AssertionError("work started before the options were checked")

    for name in ("write_digits", "fit_classifier", "run_method"):
        monkeypatch.setattr(demo, name, fail)
    monkeypatch.setattr(digits, "probe_scorer", fail)


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        digits.main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{PROG}: error: "), err
    return err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # the demo's model has DemoSettings().depth = 4 blocks: layer 9 failed after training
        (["--layers", "9"], "--layers must be a block number in 1..4"),
        (["--layers", "0"], "--layers must be a block number in 1..4"),
        (["--taus", "1.5"], "--taus must lie strictly between 0"),
        (["--taus", "0"], "--taus must lie strictly between 0"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--seeds", "-1"], "--seeds must be whole numbers >= 0"),
    ],
)
def test_a_wrong_option_is_one_line_before_any_training(extra, expected, tmp_path, capsys, no_work):
    err = _refused(["--out", str(tmp_path / "dgx"), "--seeds", "0", "--steps", "10", *extra],
                   capsys)  # fmt: skip
    assert expected in err
    assert "--layer " not in err and "--tau " not in err  # the probe command's names
    assert not (tmp_path / "dgx").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys, no_work):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert f"{taken} is a file, not a folder" in _refused(["--out", str(taken)], capsys)


def test_summarise_refuses_a_missing_log_or_one_without_records(tmp_path, capsys, no_work):
    missing = tmp_path / "nonexist.log"
    assert f"--summarise {missing}: cannot be read" in _refused(
        ["--summarise", str(missing)], capsys
    )
    other = tmp_path / "other.log"
    other.write_text('step 10 loss 0.5\n{"method": "selfflow"}\n')
    assert "no digits probe records found" in _refused(["--summarise", str(other)], capsys)


def test_summarise_prints_the_mean_and_range_of_the_logged_rows(tmp_path, capsys, no_work):
    log = tmp_path / "run.log"
    rows = [
        {"method": "selfflow", "step": 10, "seed": seed, "accuracy": acc, "probe L1 tau 0.3": p}
        for seed, acc, p in ((0, 0.5, 0.25), (1, 0.7, 0.75))
    ]
    log.write_text("noise\n" + "".join(f"seed row: {json.dumps(r)}\n" for r in rows))
    assert digits.main(["--summarise", str(log)]) == 0
    table = capsys.readouterr().out
    # mean 60 % (50-70) of the samples, mean 50 % (25-75) of the probe, over seeds 0 and 1
    assert "| selfflow | 10 | 0,1 | 60.0 % (50.0–70.0) | 50.0 % (25.0–75.0) |" in table


def test_dual_runs_like_the_demos_methods_and_repeats_are_dropped(tmp_path, monkeypatch, capsys):
    calls, scorers = [], []
    monkeypatch.setattr(demo, "write_digits", lambda folder: (None, None))
    monkeypatch.setattr(demo, "fit_classifier", lambda images, labels: None)
    monkeypatch.setattr(digits, "probe_scorer", lambda *args: scorers.append(args))

    def run_method(method, data, out, steps, classifier, settings, extra=None):
        calls.append((method, settings.seed, steps))
        return [{"method": method, "step": 0, "accuracy": 0.1, digits.cell_name(2, 0.3): 0.2}]

    monkeypatch.setattr(demo, "run_method", run_method)
    argv = ["--out", str(tmp_path), "--methods", "dual", "dual", "--seeds", "3", "3", "--steps",
            "20", "10", "20", "--layers", "2", "2", "--taus", "0.3", "0.3"]  # fmt: skip
    assert digits.main(argv) == 0
    assert calls == [("dual", 3, [10, 20])]
    assert scorers == [(tmp_path / "data", [2], [0.3])]
    assert capsys.readouterr().out.count("| dual | 0 | 3 |") == 1


def test_help_shows_the_defaults_and_every_method_of_the_demo(capsys):
    with pytest.raises(SystemExit):
        digits.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for value in ([0, 1, 2], [300, 600], list(digits.DEFAULT_LAYERS), list(digits.DEFAULT_TAUS)):
        assert f"(default: {value})" in shown
    assert "dual" in shown and "(default: 1)" in shown
