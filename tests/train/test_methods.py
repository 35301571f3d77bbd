"""The paper's ablation rows as ``--method`` presets (issue 20): ``selfflow`` (dual timesteps +
representation loss), ``flow`` (SiT: neither), ``dual`` (dual timesteps, no representation
loss, so no teacher forward at all: the flow baseline's cost)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.train import network as network_module
from selfflow.train.config import TrainConfig
from selfflow.train.network import train_step_flops, training_optimizer
from selfflow.train.step import StepRecipe, TrainStep
from selfflow.train.streams import draw_step, materialise, run_streams
from selfflow.train.trainer import train
from tests.conftest import randomize_

from .helpers import make_dataset, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def resolved(method: str, **options):
    config = TrainConfig(data="d", output_dir="o", steps=1, model="tiny", method=method, **options)
    return config.resolve((4, 8, 8), 10)


def test_each_method_resolves_to_its_row_of_the_paper():
    # (mask ratio, rep weight): Self-Flow 0.25 and 0.8; SiT neither; "without L_rep" the mask
    expected = {"selfflow": (0.25, 0.8), "flow": (0.0, 0.0), "dual": (0.25, 0.0)}
    for method, (mask, rep) in expected.items():
        s = resolved(method).settings
        assert (s.method, s.mask_ratio, s.rep_weight) == (method, mask, rep)
    assert resolved("dual", mask_ratio=0.5).settings.mask_ratio == 0.5


def test_dual_refuses_a_representation_loss_and_selfflow_without_one_says_it_is_dual():
    with pytest.raises(ConfigurationError, match="--method dual .* cannot take --rep-weight 0.5"):
        resolved("dual", rep_weight=0.5)
    notes = resolved("selfflow", rep_weight=0.0).notes
    assert any("same maths as --method dual" in note for note in notes), notes
    assert not any("--method" in note for note in resolved("dual").notes)
    flow_like = resolved("dual", mask_ratio=0.0).notes
    assert any("same maths as --method flow" in note for note in flow_like), flow_like


def test_dual_costs_what_the_flow_baseline_costs():
    for method in ("flow", "dual", "selfflow"):
        r = resolved(method)
        s = r.settings
        flops = train_step_flops(r.model, teacher_layer=s.teacher_layer, rep_weight=s.rep_weight)
        if method == "flow":
            baseline = flops
        elif method == "dual":
            assert flops == baseline
        else:
            assert flops > baseline


class Counted(torch.nn.Module):
    """A network that counts its calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def one_step(method: str, data: Path) -> tuple[dict[str, float], int]:
    """One TrainStep of ``method`` from the same random weights on step 0's batch (the batch
    is drawn with the selfflow spec, so both methods see the same times and masks)."""
    from selfflow.data import LatentDataset
    from selfflow.model.network import SelfFlowDiT

    run = tiny_config(data, "unused", method=method).resolve((4, 8, 8), 10)
    dataset = LatentDataset(data)
    spec, order = run_streams(tiny_config(data, "unused").resolve((4, 8, 8), 10), dataset)
    batch = materialise(draw_step(spec, order, 0), dataset, run.model.null_class)
    assert bool((batch.tau != batch.tau[:, :1]).any())  # the dual times are in the batch
    model = randomize_(SelfFlowDiT(run.model), seed=3)
    ema = copy.deepcopy(model).requires_grad_(False)
    teacher = Counted(ema)
    step = TrainStep(
        student=model,
        teacher=teacher,
        model=model,
        ema=ema,
        optimizer=training_optimizer(model.parameters(), lr=1e-3),
        recipe=StepRecipe.of(run.settings),
    )
    summary = step([batch]).tolist()
    return dict(zip(("loss", "flow", "rep"), summary[:3], strict=True)), teacher.calls


def test_dual_makes_no_teacher_forward_and_its_loss_is_self_flows_flow_term(data):
    selfflow, teacher_calls = one_step("selfflow", data)
    dual, dual_teacher_calls = one_step("dual", data)
    assert teacher_calls == 1 and dual_teacher_calls == 0
    assert selfflow["rep"] > 0 and dual["rep"] == 0
    assert selfflow["loss"] == pytest.approx(selfflow["flow"] + 0.8 * selfflow["rep"], rel=1e-6)
    assert dual["loss"] == dual["flow"] == selfflow["flow"]  # same draws, same student forward


def test_a_dual_run_never_calls_the_teacher_and_its_method_is_its_identity(
    data, tmp_path, monkeypatch
):
    calls = {"teacher": 0, "student": 0}
    forward = network_module.FastTrainingDiT.forward

    def counting(self, *args, **kwargs):
        calls["teacher" if kwargs.get("hidden_layer") else "student"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(network_module.FastTrainingDiT, "forward", counting)
    train(tiny_config(data, tmp_path / "dual", steps=2, method="dual"))
    assert calls == {"teacher": 0, "student": 2}
    train(tiny_config(data, tmp_path / "selfflow", steps=2))
    assert calls == {"teacher": 2, "student": 4}
    identity = json.loads((tmp_path / "dual" / "run.json").read_text())["identity"]
    assert identity["method"] == "dual" and identity["rep_weight"] == 0.0
    with pytest.raises(ConfigurationError, match=r"method: 'dual' → 'selfflow'"):
        train(tiny_config(data, tmp_path / "dual", steps=3, method="selfflow"))


def test_help_names_the_methods_and_the_validation_options(capsys):
    from selfflow import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("selfflow,flow,dual", "--val-data", "--val-every", "--val-samples"):
        assert words in text, words
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "--val-per-class" in capsys.readouterr().out
