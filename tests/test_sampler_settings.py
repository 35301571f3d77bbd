"""The sampler's settings: one definition whose defaults and checks every entry point shares."""

from __future__ import annotations

import argparse
import math

import pytest

from selfflow.base.errors import ConfigurationError
from selfflow.batch.config import BatchConfig
from selfflow.options import add_options
from selfflow.sampling.settings import OPTION_NAMES, PYTHON_NAMES, SamplerSettings

BAD = [
    ({"num_steps": 1}, "num_steps", "must be at least 2"),
    ({"num_steps": True}, "num_steps", "must be at least 2"),
    ({"mode": "dde"}, "mode", "must be SDE or ODE"),
    ({"solver": "rk4"}, "solver", "must be euler or heun"),
    ({"cfg_scale": -0.5}, "cfg_scale", "must be >= 0 and finite"),
    ({"cfg_scale": math.inf}, "cfg_scale", "must be >= 0 and finite"),
    ({"guidance_interval": (-0.1, 0.5)}, "guidance_low", "must lie in [0, 1]"),
    ({"guidance_interval": (0.1, 1.5)}, "guidance_high", "must lie in [0, 1]"),
    ({"guidance_interval": (0.8, 0.5)}, "guidance_low", "must not exceed"),
]


@pytest.mark.parametrize(("values", "key", "reason"), BAD)
def test_a_bad_value_is_refused_in_the_callers_words(values, key, reason):
    with pytest.raises(ConfigurationError) as python:
        SamplerSettings(**values)
    assert str(python.value).startswith(PYTHON_NAMES[key])
    assert reason in str(python.value)
    with pytest.raises(ConfigurationError) as option:
        SamplerSettings(**values, names=OPTION_NAMES)
    assert str(option.value).startswith(OPTION_NAMES[key])
    assert reason in str(option.value)


@pytest.mark.parametrize(("values", "key", "reason"), BAD)
def test_the_batch_refuses_what_the_sampler_refuses(values, key, reason):
    values = dict(values)
    low, high = values.pop("guidance_interval", (0.0, 0.7))
    config = BatchConfig(num_samples=4, guidance_low=low, guidance_high=high, **values)
    with pytest.raises(ConfigurationError, match=OPTION_NAMES[key]) as error:
        config.validate()
    assert reason in str(error.value)


def test_mode_and_solver_in_any_case_and_the_modes_own_step_count():
    settings = SamplerSettings(mode="ODE", solver="Euler")
    assert (settings.mode, settings.solver, settings.num_steps) == ("ode", "euler", 50)
    assert SamplerSettings().num_steps == 250
    config = BatchConfig(num_samples=4, mode="ODE")
    config.validate()
    assert config.num_steps == 50


def test_the_command_line_the_batch_and_the_api_share_one_set_of_defaults():
    parser = argparse.ArgumentParser()
    names = ["--num-steps", "--mode", "--seed", "--cfg-scale", "--guidance-low"]
    add_options(parser, *names, "--guidance-high", "--solver")
    args = parser.parse_args([])
    settings, config = SamplerSettings(), BatchConfig()
    assert args.mode.lower() == settings.mode == config.mode
    assert args.solver == settings.solver == config.solver
    assert args.cfg_scale == settings.cfg_scale == config.cfg_scale
    assert (args.guidance_low, args.guidance_high) == settings.guidance_interval
    assert (config.guidance_low, config.guidance_high) == settings.guidance_interval
    assert args.seed == config.seed
    assert args.num_steps is None and config.num_steps is None  # the mode's default
