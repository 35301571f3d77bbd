"""``python -m selfflow.train.demo``: its numbers are checked before the digits are written or
a step is trained, in one line naming the demo's own options (not the trainer's
``--checkpoint-every`` or the exporter's ``--ema-length``, which the demo does not have)."""

from __future__ import annotations

import pytest

from selfflow.train import demo

PROG = "python -m selfflow.train.demo"


@pytest.fixture
def no_work(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("work started before the options were checked")

    for name in ("write_digits", "fit_classifier", "run_method", "posthoc_sweep"):
        monkeypatch.setattr(demo, name, fail)
    monkeypatch.setattr(demo.torch, "set_num_threads", fail)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--steps", "-5"], "--steps must be at least 1; got -5"),  # named --checkpoint-every
        (["--steps", "100", "0"], "--steps must be at least 1; got 0"),
        (["--threads", "0"], "--threads must be at least 1; got 0"),  # torch's RuntimeError
        (["--ema-sweep", "0.5"], "--ema-sweep must be a relative EMA length"),  # --ema-length
        (["--ema-sweep", "0.1", "-0.1"], "--ema-sweep must be a relative EMA length"),
        (["--posthoc-ema", "0.3"], "--posthoc-ema must be a relative EMA length"),
        (["--posthoc-ema", "0.1", "0.1"], "--posthoc-ema lists a σ_rel twice"),
    ],
)
def test_a_wrong_number_is_one_line_before_any_training(extra, expected, tmp_path, capsys, no_work):
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(tmp_path / "demo"), *extra])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{PROG}: error: "), err
    assert expected in err
    assert not (tmp_path / "demo").exists()


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys, no_work):
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(taken)])
    assert stopped.value.code == 1
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: [200, 400, 800])" in shown and "(default: ['selfflow', 'flow'])" in shown
    assert "(default: 1)" in shown and "(default: [0.05, 0.1])" in shown
