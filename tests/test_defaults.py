"""Defaults that fit the mode (the ODE's own step count), --mode's spelling, step progress."""

from __future__ import annotations

import json

import pytest
import torch

from selfflow import cli
from selfflow.batch import progress, runner
from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline


def counting_pipeline(model):
    calls = []

    def network(x, tau, y):
        calls.append(x.shape[0])
        return model(x, tau, y)

    return SelfFlowPipeline(model, None, device="cpu", model_fn=network), calls


@pytest.mark.parametrize(("mode", "steps"), [("ode", 50), ("sde", 250)])
def test_without_num_steps_each_mode_takes_its_own_default(tiny_model, mode, steps):
    pipe, calls = counting_pipeline(tiny_model)
    labels = torch.tensor([3, 5])
    implicit = pipe.sample_latents(labels, [0, 1], 0, SamplerSettings(mode=mode))
    default_calls = len(calls)
    calls.clear()
    explicit = pipe.sample_latents(labels, [0, 1], 0, SamplerSettings(steps, mode))
    assert default_calls == len(calls)
    assert torch.equal(implicit, explicit)
    # Heun takes at most two evaluations per interval; the SDE one per grid point
    assert default_calls == steps if mode == "sde" else steps < default_calls <= 2 * steps


def test_sample_ode_without_num_steps_records_fifty(tmp_path, tiny_checkpoint, tiny_vae_dir):
    out = tmp_path / "samples"
    args = ["sample", "--ckpt", tiny_checkpoint, "--vae", tiny_vae_dir, "--output-dir", str(out),
            "--num-fid-samples", "2", "--batch-size", "2", "--mode", "ODE"]  # fmt: skip
    assert cli.main(args) == 0
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert (settings["mode"], settings["num_steps"]) == ("ode", 50)


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_help_states_both_defaults_and_the_mode_spelling_agrees(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "250 for SDE" in text and "50 for ODE" in text
    assert "[--mode {SDE,ODE}]" in text and "--mode {SDE,ODE}" in text
    with pytest.raises(SystemExit):
        cli.main([command, "--mode", "euler"])
    err = capsys.readouterr().err
    assert "(choose from 'SDE', 'ODE')" in err  # the spelling the usage line shows


def test_lower_case_modes_are_accepted(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["sample", "--mode", "ode"]).mode == "ODE"
    assert parser.parse_args(["generate", "--mode", "sde"]).mode == "SDE"


def test_a_long_batch_shows_its_step_count(tmp_path, tiny_checkpoint, tiny_vae_dir, monkeypatch,
                                           capsys):  # fmt: skip
    monkeypatch.setattr(progress, "STEP_PROGRESS_AFTER", 0.0)  # every batch counts as long
    config = runner.BatchConfig(
        checkpoint=tiny_checkpoint, vae=tiny_vae_dir, output_dir=tmp_path / "s", num_samples=3,
        batch_size=2, num_steps=4,
    )  # fmt: skip
    runner.generate_fid_batch(config, progress=True, log=lambda message: None)
    assert "batch at step 4/4" in capsys.readouterr().err


def test_a_short_batch_shows_no_step_count(tmp_path, tiny_checkpoint, tiny_vae_dir, capsys):
    config = runner.BatchConfig(
        checkpoint=tiny_checkpoint, vae=tiny_vae_dir, output_dir=tmp_path / "s", num_samples=3,
        batch_size=2, num_steps=4,
    )  # fmt: skip
    runner.generate_fid_batch(config, progress=True, log=lambda message: None)
    assert "batch at step" not in capsys.readouterr().err
