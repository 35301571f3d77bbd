"""The trainer in one process on the CPU: same maths for any split, exact resume, checkpoints,
exports, bad input. (Several processes and killed runs: test_trainer_processes.py.)"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from selfflow.base.errors import CheckpointError, ConfigurationError, SelfFlowError
from selfflow.model.checkpoint import load_model, save_model
from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline
from selfflow.train import network as fast_module
from selfflow.train import state as run_state
from selfflow.train import step as step_module
from selfflow.train.config import TrainConfig, choose_layers, label_space_note
from selfflow.train.ema import make_ema, update_ema
from selfflow.train.step import SUMMARY_FIELDS, TrainStep
from selfflow.train.streams import (
    DataOrder,
    Prefetcher,
    StreamSpec,
    draw_step,
    materialise,
    micro_batches,
    process_range,
    process_rows,
)
from selfflow.train.trainer import NonFiniteLossError, train

from .helpers import (
    assert_logs_close,
    assert_states_close,
    assert_states_equal,
    cli_args,
    final_state,
    folder_snapshot,
    log_records,
    make_dataset,
    tiny_config,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """Four steps, global batch 8 in one micro-batch: what the other splits must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(data, out))
    return out


# -- settings --------------------------------------------------------------------------------------


def test_layers_default_to_three_and_seven_tenths_of_the_depth():
    assert choose_layers(28, None, None, True)[:2] == (8, 20)  # the paper's XL/2
    assert choose_layers(12, None, None, True)[:2] == (4, 8)
    assert choose_layers(24, None, None, True)[:2] == (7, 17)


def test_coinciding_default_layers_move_the_teacher_one_block_deeper_and_say_so():
    student, teacher, note = choose_layers(2, None, None, True)
    assert (student, teacher) == (1, 2)
    assert note and "teacher layer 2" in note


def test_a_teacher_layer_not_deeper_than_the_student_is_refused():
    with pytest.raises(ConfigurationError, match="deeper than the student"):
        choose_layers(12, 5, 5, True)
    with pytest.raises(ConfigurationError, match="depth-1 model has no two blocks"):
        choose_layers(1, None, None, True)
    with pytest.raises(ConfigurationError, match="not a block"):
        choose_layers(12, 13, None, True)
    assert choose_layers(1, None, None, False)[:2] == (1, 1)  # flow: layers unused


def test_method_flow_is_plain_flow_matching_and_refuses_selfflow_settings():
    resolved = TrainConfig(data="d", output_dir="o", steps=1, model="tiny", method="flow").resolve(
        (4, 8, 8), 10
    )
    assert resolved.settings.mask_ratio == 0 and resolved.settings.rep_weight == 0
    with pytest.raises(ConfigurationError, match="--method flow"):
        TrainConfig(data="d", output_dir="o", steps=1, method="flow", mask_ratio=0.25).validate()


def test_sizes_come_from_the_presets_and_the_data():
    resolved = TrainConfig(data="d", output_dir="o", steps=1, model="B/2").resolve((3, 16, 16), 7)
    m = resolved.model
    assert (m.hidden_size, m.depth, m.num_heads) == (768, 12, 12)
    assert (m.in_channels, m.input_size, m.num_classes, m.null_class) == (3, 16, 7, 7)


@pytest.mark.parametrize(
    ("global_batch", "batch", "world", "message"),
    [(10, None, 4, "does not divide over 4 processes"), (8, 3, 2, "does not divide the 4")],
)
def test_batch_sizes_that_do_not_divide_are_refused(global_batch, batch, world, message):
    config = TrainConfig(
        data="d", output_dir="o", steps=1, model="tiny", global_batch_size=global_batch,
        batch_size=batch,
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match=message):
        config.resolve((4, 8, 8), 10, world_size=world)


# -- the streams -----------------------------------------------------------------------------------


def spec(**overrides) -> StreamSpec:
    base = StreamSpec(3, 12, (4, 8, 8), 16, 0.25, 0.1, True)
    return replace(base, **overrides)


def test_each_epoch_visits_every_image_once_in_a_seeded_order():
    order = DataOrder(5, 10)
    first_two = order.indices(0, 20)
    assert sorted(first_two[:10]) == list(range(10)) == sorted(first_two[10:])
    assert not np.array_equal(first_two[:10], first_two[10:])  # a new permutation per epoch
    assert np.array_equal(DataOrder(5, 10).indices(7, 6), first_two[7:13])  # straddles epochs
    assert not np.array_equal(DataOrder(6, 10).indices(0, 10), first_two[:10])


def test_a_process_and_micro_batch_split_sees_the_global_batch_s_numbers():
    whole = draw_step(spec(), DataOrder(3, 40), step=5)
    parts = [mb for rank in range(3) for mb in micro_batches(process_rows(whole, rank, 3), 2)]
    assert len(parts) == 6
    assert np.array_equal(np.concatenate([p.indices for p in parts]), whole.indices)
    for name in ("posterior", "noise", "tau", "tau_teacher", "drop"):
        joined = torch.cat([getattr(p, name) for p in parts])
        assert torch.equal(joined, getattr(whole, name)), name
    # a process draws only its rows (the large tensors block by block), and they are the
    # whole batch's rows, for shares that cut blocks and shares that do not
    whole48 = draw_step(spec(global_batch=48), DataOrder(3, 40), step=5)  # 3 blocks of 16
    for world in (1, 2, 3, 4, 6, 12):
        for rank in range(world):
            share = process_range(48, rank, world)
            own = draw_step(spec(global_batch=48), DataOrder(3, 40), 5, rows=share)
            cut = process_rows(whole48, rank, world)
            assert np.array_equal(own.indices, cut.indices)
            for name in ("posterior", "noise", "tau", "tau_teacher", "drop"):
                assert torch.equal(getattr(own, name), getattr(cut, name)), (world, rank, name)
    again = draw_step(spec(), DataOrder(3, 40), step=5)
    assert torch.equal(again.noise, whole.noise)  # a function of (seed, step) alone
    other = draw_step(spec(), DataOrder(3, 40), step=6)
    assert not torch.equal(other.noise, whole.noise)


def test_label_drops_follow_the_dropout_probability():
    drops = torch.cat(
        [draw_step(spec(global_batch=500), DataOrder(3, 40), k).drop for k in range(20)]
    ).float()
    # 10 000 Bernoulli(0.1) draws: standard error 0.003
    assert abs(float(drops.mean()) - 0.1) < 0.012


# -- the same maths for any split ------------------------------------------------------------------


def test_gradient_accumulation_gives_the_same_weights(tmp_path, data, reference):
    out = tmp_path / "accumulated"
    train(tiny_config(data, out, batch_size=2))  # four micro-batches per step
    a, b = final_state(reference), final_state(out)
    assert_states_close(a, b)
    assert_logs_close(reference, out)


def test_a_gradient_four_times_too_large_passes_the_weights_but_not_the_logs(
    tmp_path, data, reference, monkeypatch
):
    # a forgotten 1/accumulation factor: clipping and AdamW hide it in the weights
    real = step_module.self_flow_loss

    def scaled(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * 4, parts

    monkeypatch.setattr(step_module, "self_flow_loss", scaled)
    out = tmp_path / "scaled"
    train(tiny_config(data, out, batch_size=2))
    assert_states_close(final_state(reference), final_state(out))
    with pytest.raises(AssertionError, match="grad_norm|loss"):
        assert_logs_close(reference, out)


def test_the_fast_network_trains_the_same_weights_as_the_plain_model(tmp_path, data, reference):
    # the reference run uses the default fast network (FastTrainingDiT); its twin is the model
    out = tmp_path / "plain"
    train(tiny_config(data, out, network="plain"))
    assert_states_close(final_state(reference), final_state(out))
    assert_logs_close(reference, out)


def test_compile_routes_every_block_through_the_compiled_function(
    tmp_path, data, reference, monkeypatch
):
    # --compile on the CPU, with the compiled function replaced by a counting eager twin (the
    # real compiled block is held to the plain model in test_fast_training.py): the switch
    # reaches both networks, and the run is the default eager run's, weight for weight.
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return fast_module.fast_block(*args)

    monkeypatch.setattr(fast_module, "_compiled_block", counting)
    out, lines = tmp_path / "compiled", []
    train(tiny_config(data, out, compile=True), log=lines.append)
    assert any("fast network (compiled)" in line for line in lines)
    assert len(calls) == 4 * (2 + 2)  # 4 steps: the student's 2 blocks, the teacher's (to 2)
    assert_states_equal(final_state(reference), final_state(out))
    lines.clear()
    calls.clear()
    train(tiny_config(data, tmp_path / "eager", compile=False), log=lines.append)
    assert calls == [] and any("fast network (eager)" in line for line in lines)


def test_a_failing_compiler_is_one_line_that_names_no_compile(tmp_path, data, monkeypatch):
    def broken(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(
            "inductor", RuntimeError("Failed to find C compiler. Please specify via CC"), None
        )

    monkeypatch.setattr(fast_module, "_compiled_block", broken)
    with pytest.raises(SelfFlowError, match="--no-compile") as caught:
        train(tiny_config(data, tmp_path / "run", compile=True))
    message = str(caught.value)
    assert "\n" not in message and "Failed to find C compiler" in message
    # an error of the step itself is not dressed up as a compiler failure: neither a plain
    # one nor dynamo's own complaint about the traced code (a bug to fix, not a set-up)
    monkeypatch.setattr(fast_module, "_compiled_block", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_config(data, tmp_path / "other", compile=True))

    def unsupported(*args):
        raise torch._dynamo.exc.Unsupported("data-dependent branch in fast_block")

    monkeypatch.setattr(fast_module, "_compiled_block", unsupported)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        train(tiny_config(data, tmp_path / "third", compile=True))


def test_a_missing_cpp_compiler_stops_the_first_step_with_that_line(tmp_path, data, monkeypatch):
    # a real failure of torch.compile: inductor's CPU code needs a C++ compiler, as Triton on
    # a GPU needs a C compiler
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # nothing from earlier runs
    monkeypatch.setattr(fast_module, "_compiled_block", None)
    torch._dynamo.reset()
    try:
        with pytest.raises(SelfFlowError, match="no-such-g\\+\\+.*--no-compile"):
            train(tiny_config(data, tmp_path / "run", compile=True, steps=1))
    finally:
        torch._dynamo.reset()


def test_compile_with_the_plain_network_is_refused_before_any_work(tmp_path, data):
    with pytest.raises(ConfigurationError, match="--network plain"):
        train(tiny_config(data, tmp_path / "run", compile=True, network="plain"))
    assert not (tmp_path / "run").exists()
    args = cli.build_parser().parse_args(["train", "--data", "d", "--output-dir", "o",
                                          "--steps", "1", "--no-compile"])  # fmt: skip
    assert args.compile is False


def test_a_dry_run_checks_and_plans_but_writes_nothing(tmp_path, data, reference, capsys):
    # a new run: every check, the plan, and no folder
    lines: list[str] = []
    result = train(tiny_config(data, tmp_path / "new" / "run"), log=lines.append, dry_run=True)
    assert result.step == 0 and result.checkpoint is None and not (tmp_path / "new").exists()
    text = "\n".join(lines)
    assert "a new run in" in text and "4 steps × 8 = 32 images to go, 0.80 epochs" in text
    if not torch.cuda.is_available():
        assert "no CUDA here and no --device: planned for the CPU" not in text  # --device cpu
        cuda_lines: list[str] = []
        train(tiny_config(data, tmp_path / "new" / "run", device="cuda"), log=cuda_lines.append,
              dry_run=True)  # fmt: skip
        assert any("bfloat16 on cuda:0, fast network (compiled)" in line for line in cuda_lines)
        assert any("no CUDA here: the device" in line for line in cuda_lines)
    with pytest.raises(CheckpointError):  # --init-from is read and checked, as at a start
        train(tiny_config(data, tmp_path / "new" / "run", init_from=str(tmp_path / "none.pt")),
              dry_run=True)  # fmt: skip
    assert not (tmp_path / "new").exists()
    assert "the finished run keeps 2 (the newest 3)" in text  # checkpoints at steps 2 and 4
    assert "GB free there now" in text and "nothing was written" in text
    # a resume, through the command line: the newest checkpoint is found and checked, and the
    # folder is left as it was, a temporary a real start would delete included
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "checkpoints" / ".step_000000006.pt.tmp-99999").write_bytes(b"half")
    before = folder_snapshot(run)
    config = tiny_config(data, run, steps=6)
    assert cli.main(["train", *cli_args(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "resumes at step 4 in" in out and "2 steps × 8 = 16 images to go" in out
    assert "would resume from" in out and "selfflow train: at step" not in out
    assert folder_snapshot(run) == before
    # a damaged newest checkpoint is named and the previous one planned from, as a start does
    newest = run_state.checkpoint_path(run, 4)
    newest.write_bytes(newest.read_bytes()[:-100])
    before = folder_snapshot(run)
    lines.clear()
    train(config, log=lines.append, dry_run=True)
    assert "resumes at step 2 in" in "\n".join(lines) and folder_snapshot(run) == before
    assert any(newest.name in line for line in lines)  # the damaged one is named
    # refused as a start refuses: another run's settings, a folder in use, a path through a file
    with pytest.raises(ConfigurationError, match="seed: 0 → 3"):
        train(tiny_config(data, run, seed=3), dry_run=True)
    from selfflow.base.lock import FolderLock

    holder = FolderLock(run, "selfflow train").acquire()  # a running training
    with holder, pytest.raises(ConfigurationError, match="is in use by `selfflow train`"):
        train(config, dry_run=True)
    assert not (run / ".lock").exists()
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        train(tiny_config(data, run / "run.json" / "inner"), dry_run=True)


def test_bf16_autocast_trains_close_to_float32(tmp_path, data, reference):
    out = tmp_path / "bf16"
    lines: list[str] = []
    train(tiny_config(data, out, dtype="bfloat16"), log=lines.append)
    assert any("bfloat16 on cpu" in line for line in lines)
    state = final_state(out)
    assert state["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float32  # weights stay fp32
    bf16 = [record["loss"] for record in log_records(out)]
    fp32 = [record["loss"] for record in log_records(reference)]
    # same batches, bf16 rounding only
    assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(bf16, fp32, strict=True))
    assert bf16 != fp32  # autocast did change the arithmetic


def test_method_flow_trains_without_teacher_and_keeps_the_projector(tmp_path, data):
    out = tmp_path / "flow"
    result = train(tiny_config(data, out, steps=2, method="flow"))
    state = final_state(out)
    train(tiny_config(data, tmp_path / "flow0", steps=1, method="flow", lr=1e-12))
    initial = final_state(tmp_path / "flow0")["model"]
    assert torch.equal(
        state["model"]["projector.linear1.weight"], initial["projector.linear1.weight"]
    )
    assert not torch.allclose(
        state["model"]["final_layer.linear.weight"], initial["final_layer.linear.weight"]
    )
    assert result.last_metrics["rep"] == 0.0


def test_training_moves_the_weights_and_the_ema_follows(reference, data, tmp_path):
    # the initial weights: one step with a negligible learning rate (Adam moves each weight
    # by about lr)
    train(tiny_config(data, tmp_path / "zero", steps=1, lr=1e-12))
    initial = final_state(tmp_path / "zero", 1)["model"]
    trained = final_state(reference)
    moved = [k for k in initial if not torch.allclose(initial[k], trained["model"][k])]
    assert len(moved) > len(initial) // 2
    ema_moved = [k for k in initial if not torch.allclose(initial[k], trained["ema"][k])]
    assert ema_moved


def test_stopping_and_rerunning_continues_bit_identically(tmp_path, data, reference):
    out = tmp_path / "resumed"
    train(tiny_config(data, out, steps=2))
    result = train(tiny_config(data, out))  # same command with more steps: resumes at 2
    assert result.step == 4
    assert_states_equal(final_state(reference), final_state(out))
    steps = [record["step"] for record in log_records(out)]
    assert steps == [1, 2, 3, 4]  # nothing replayed, nothing skipped


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(
    tmp_path, data, reference, capsys
):
    out = tmp_path / "damaged"
    train(tiny_config(data, out, steps=3, checkpoint_every=1, keep_last=5))
    newest = run_state.checkpoint_path(out, 3)
    raw = bytearray(newest.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(8)  # inside the tensor data
    newest.write_bytes(bytes(raw))
    lines: list[str] = []
    result = train(tiny_config(data, out), log=lines.append)
    assert any("step_000000003.pt is damaged" in line for line in lines), lines
    assert any("resuming from" in line and "step_000000002.pt" in line for line in lines)
    assert result.step == 4
    assert_states_equal(final_state(reference), final_state(out))


def test_old_checkpoints_are_pruned_keeping_milestones(tmp_path, data):
    out = tmp_path / "pruned"
    train(tiny_config(data, out, steps=6, checkpoint_every=1, keep_last=2, keep_every=3))
    assert [s for s, _ in run_state.list_checkpoints(out)] == [3, 5, 6]
    exports = sorted(p.name for p in (out / "checkpoints").glob("*-ema.pt"))
    assert exports == [f"step_{s:09d}-ema.pt" for s in (3, 5, 6)]


@pytest.mark.parametrize("steps, every, keep_last, keep_every", [(10, 2, 3, 4), (7, 3, 2, None)])
def test_the_plan_counts_the_checkpoints_a_finished_run_keeps(
    tmp_path, data, steps, every, keep_last, keep_every
):
    # a real run with these settings: the dry run's figure must be what it leaves on disk
    config = tiny_config(data, tmp_path / "run", steps=steps, checkpoint_every=every,
                         keep_last=keep_last, keep_every=keep_every)  # fmt: skip
    train(config)
    kept = run_state.kept_checkpoints(config)
    assert kept == len(run_state.list_checkpoints(tmp_path / "run")) > keep_last - 1


def test_ema_starts_as_an_exact_copy_and_follows_the_formula():
    model = SelfFlowDiT(ModelConfig.tiny())
    ema = make_ema(model)
    for a, b in zip(ema.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b) and not a.requires_grad
    reference = make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema, model, 0.9)
    with torch.no_grad():  # the formula, parameter by parameter
        for averaged, current in zip(reference.parameters(), model.parameters(), strict=True):
            averaged.copy_(0.9 * averaged + (1.0 - 0.9) * current)
    for a, b in zip(ema.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- export ---------------------------------------------------------------------------------------


def test_export_is_the_ema_and_loads_strictly_and_samples(tmp_path, reference):
    out = tmp_path / "ema.pt"
    assert cli.main(["export", str(reference), str(out)]) == 0
    model = load_model(out)
    state = final_state(reference)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["ema"][key]), key
    beside = load_model(run_state.export_path(reference, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in beside.state_dict().items())
    pipe = SelfFlowPipeline(model)
    latents = pipe.sample_latents(
        torch.tensor([0, 9, 10]), [0, 1, 2], 0, SamplerSettings(num_steps=4, mode="sde")
    )  # label 10 is this 10-class model's null row
    assert latents.shape == (3, 4, 8, 8) and bool(torch.isfinite(latents).all())


def test_a_training_checkpoint_loads_as_its_ema_with_its_config_and_card(reference, capsys):
    """``sample --ckpt checkpoints/step_N.pt`` once said "pass config=ModelConfig(...) to
    load_model": the checkpoint records its config (in the run identity) and its card."""
    from selfflow.model.checkpoint import read_card

    checkpoint = run_state.checkpoint_path(reference, 4)
    model = load_model(checkpoint)
    export = load_model(run_state.export_path(reference, 4))
    assert model.config == export.config
    assert model.checkpoint_info.card == export.checkpoint_info.card
    assert read_card(checkpoint) == read_card(run_state.export_path(reference, 4))
    ema = final_state(reference, 4)["ema"]
    assert all(torch.equal(value, ema[key]) for key, value in model.state_dict().items())
    assert cli.main(["classes", "--ckpt", str(checkpoint)]) == 0
    assert "c9" in capsys.readouterr().out


def test_export_of_a_folder_without_checkpoints_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no intact training checkpoint"):
        from selfflow.train.export import export_run

        export_run(tmp_path, tmp_path / "x.pt")


# -- bad input ------------------------------------------------------------------------------------


def test_missing_and_foreign_dataset_folders_are_refused(tmp_path):
    with pytest.raises(SelfFlowError, match="missing"):
        train(tiny_config(tmp_path / "nothing", tmp_path / "run"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(SelfFlowError):
        train(tiny_config(tmp_path / "foreign", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_dataset_the_model_cannot_patch_is_refused(tmp_path):
    data = make_dataset(tmp_path / "odd", n=8, shape=(4, 7, 7))
    with pytest.raises(ConfigurationError, match="multiple of the patch size"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_init_from_a_file_with_other_shapes_names_the_keys(tmp_path, data):
    other = tmp_path / "other.pt"
    save_model(SelfFlowDiT(replace(ModelConfig.tiny(), num_classes=5)), other)
    with pytest.raises(CheckpointError, match="y_embedder.embedding_table.weight"):
        train(tiny_config(data, tmp_path / "run", init_from=str(other)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_num_classes_widens_the_label_space_to_fine_tune_a_larger_model(
    tmp_path, data, monkeypatch
):
    """A 10-class subset fine-tunes a 25-class model (as ImageNet subsets fine-tune the released
    1000-class one): the init file loads, the null label is 25, and the label space stays."""
    wide = tmp_path / "wide.pt"
    save_model(SelfFlowDiT(replace(ModelConfig.tiny(), num_classes=25)), wide)
    resolved = tiny_config(data, tmp_path / "x", num_classes=25).resolve((4, 8, 8), 10)
    assert resolved.model.num_classes == 25 and resolved.model.null_class == 25
    out = tmp_path / "run"
    real_step, labels = TrainStep.__call__, []

    def recording(self, batches, stop=False):
        labels.extend(int(y) for batch in batches for y in batch.y)
        return real_step(self, batches, stop)

    monkeypatch.setattr(TrainStep, "__call__", recording)
    config = tiny_config(data, out, steps=2, init_from=str(wide), num_classes=25)
    train(replace(config, label_dropout=0.5, sample_every=2))
    assert 25 in labels and set(labels) <= set(range(10)) | {25}  # dropped: the model's null
    assert (out / "samples" / "step_000000002.png").is_file()
    exported = load_model(run_state.export_path(out, 2))
    assert exported.config.num_classes == 25
    assert exported.y_embedder.embedding_table.weight.shape[0] == 26  # 25 classes + null
    # resuming without the option is another model: refused, naming the difference
    with pytest.raises(ConfigurationError, match=r"model_config\.num_classes: 25 → 10"):
        train(tiny_config(data, out, steps=3, init_from=str(wide)))
    with pytest.raises(ConfigurationError, match="at least that many"):
        train(tiny_config(data, tmp_path / "narrow", num_classes=9))


def test_a_1000_class_model_on_other_classes_says_which_imagenet_label_each_retrains(
    tmp_path, data
):
    """Folders that are not ImageNet's first K wnids in a 1000-class label space: a note (not a
    refusal: re-using the label slots may be meant) naming where the first stray class lands."""
    lines: list[str] = []
    train(tiny_config(data, tmp_path / "run", steps=1, num_classes=1000), log=lines.append)
    notes = [line for line in lines if "not ImageNet's first 10" in line]
    assert len(notes) == 1, lines
    assert "'c0'" in notes[0] and "n01440764 'tench'" in notes[0] and "--classes K" in notes[0]
    # ImageNet's own first three and then a stranger: the fourth (tiger shark) is named
    wnids = ["n01440764", "n01443537", "n01484850"]
    note = label_space_note([*wnids, "my_cat"], 1000)
    assert note is not None and "class 3 is 'my_cat'" in note and "'tiger shark'" in note
    assert label_space_note([*wnids, "n01491361"], 1000) is None  # the first four: as prepared
    assert label_space_note(["c0", "c1"], 25) is None  # not the released model's label space
    assert label_space_note(["c0", "c1"], 2) is None  # the data's own label space


def test_init_from_an_export_starts_from_its_weights(tmp_path, data, reference):
    source = run_state.export_path(reference, 4)
    out = tmp_path / "finetune"
    train(tiny_config(data, out, steps=1, lr=1e-12, init_from=str(source)))
    start = final_state(out)["model"]
    exported = load_model(source).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(start[key], value, rtol=1e-6, atol=1e-6)


def test_init_from_is_read_only_for_a_new_run_and_not_kept(tmp_path, data, reference, monkeypatch):
    # a resume takes every weight from its checkpoint: the --init-from file may be gone by then
    from selfflow.train import trainer

    real_build, kept = trainer.Trainer._build, []

    def build(self):
        step = real_build(self)
        kept.append(self.init_state)
        return step

    monkeypatch.setattr(trainer.Trainer, "_build", build)
    source = tmp_path / "init.pt"
    source.write_bytes(run_state.export_path(reference, 4).read_bytes())
    out = tmp_path / "run"
    train(tiny_config(data, out, steps=2, init_from=str(source)))
    assert kept == [None]  # dropped once the model is built
    source.unlink()
    result = train(tiny_config(data, out, steps=4, init_from=str(source)))
    assert result.step == 4


def test_a_run_folder_with_another_configuration_is_refused_naming_it(tmp_path, data):
    out = tmp_path / "run"
    train(tiny_config(data, out, steps=1))
    with pytest.raises(ConfigurationError, match=r"lr: 0\.001 → 0\.002"):
        train(tiny_config(data, out, steps=2, lr=2e-3))
    # settings that only say how the run is computed may change
    result = train(tiny_config(data, out, steps=2, batch_size=4, checkpoint_every=5))
    assert result.step == 2


def test_a_full_disk_is_refused_before_any_work(tmp_path, data, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(run_state.DiskFullError, match="MiB free"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_disk_filling_up_while_saving_leaves_nothing_half_written(tmp_path, data, monkeypatch):
    import errno

    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(run_state.DiskFullError, match="no space left"):
        train(tiny_config(data, tmp_path / "run"))
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    ("bad_step", "message", "kept"),
    [
        (3, r"step 3.*step_000000002\.pt", [2]),
        # a checkpoint is due after the bad step itself: it is read before anything is written
        (2, r"step 2.*no checkpoint yet", []),
    ],
)
def test_a_non_finite_loss_stops_with_the_step_and_the_checkpoint(
    tmp_path, data, monkeypatch, bad_step, message, kept
):
    real = step_module.self_flow_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * math.nan if calls["n"] == bad_step else loss), parts

    monkeypatch.setattr(step_module, "self_flow_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=message):
        train(tiny_config(data, out))
    assert [s for s, _ in run_state.list_checkpoints(out)] == kept
    assert not run_state.export_path(out, bad_step).exists()
    logged = [record["step"] for record in log_records(out)]
    assert bad_step not in logged and all(step < bad_step for step in logged)


@pytest.mark.parametrize(
    ("sample_every", "stopped_after", "grids"),
    [
        (1, 2, [1]),  # a grid is due every step: every summary is read at once
        (0, 3, []),  # nothing due: step 2's summary (with the flag) is read during step 3
    ],
)
def test_a_stop_signal_checkpoints_and_skips_the_periodic_sample_and_eval(
    tmp_path, data, monkeypatch, sample_every, stopped_after, grids
):
    # after SIGTERM the scheduler's grace period is for the checkpoint, not for sampling
    from selfflow.train import trainer, watch

    real_step, sampled, calls = TrainStep.__call__, [], []

    def signal_in_second(self, batches, stop=False):
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # as a scheduler's SIGTERM arriving while step 2 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batches, stop)

    monkeypatch.setattr(TrainStep, "__call__", signal_in_second)
    monkeypatch.setattr(watch.Watch, "sample_grid", lambda self, step: sampled.append(step))
    out = tmp_path / "run"
    config = tiny_config(data, out, steps=8, sample_every=sample_every, checkpoint_every=100)
    with pytest.raises(trainer.StoppedBySignal, match=f"after step {stopped_after};"):
        train(config)
    assert sampled == grids and len(calls) == stopped_after
    assert [s for s, _ in run_state.list_checkpoints(out)] == [stopped_after]


def test_evaluation_of_a_model_of_its_own_classes_is_accepted(tmp_path, data):
    """The FID batch draws labels from the model's own label space (issue #23 item 1), so a
    10-class run may be evaluated against a reference batch of its own classes."""
    from types import SimpleNamespace

    from selfflow.train.watch import check_watch_options

    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"x")
    resolved = tiny_config(data, tmp_path / "run", eval_every=2, eval_ref=str(ref)).resolve(
        (4, 8, 8), 10
    )
    check_watch_options(resolved, SimpleNamespace(vae="a-vae", num_classes=10))
    check_watch_options(resolved, SimpleNamespace(vae="a-vae", num_classes=1000))


def test_evaluation_of_a_pixel_dataset_is_refused_before_training(tmp_path, data):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"x")
    with pytest.raises(ConfigurationError, match="stored without one"):
        train(tiny_config(data, tmp_path / "run", eval_every=2, eval_ref=str(ref)))
    with pytest.raises(ConfigurationError, match="needs --eval-ref"):
        train(tiny_config(data, tmp_path / "run", eval_every=2))


def test_logs_and_sample_grid(tmp_path, data):
    out = tmp_path / "run"
    train(tiny_config(data, out, steps=3, sample_every=2, checkpoint_every=2))
    records = log_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    # what each checkpoint (steps 2 and the end, 3) took to write, beside the training rates
    saves = log_records(out, "checkpoint")
    assert [r["step"] for r in saves] == [2, 3]
    assert all(0 < r["seconds"] < 60 for r in saves)
    for key in ("loss", "flow", "rep", "grad_norm", "lr", "images_per_s", "steps_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(0 <= r["data_wait"] <= 1 for r in records)
    assert all(abs(r["loss"] - (r["flow"] + 0.8 * r["rep"])) < 1e-5 for r in records)
    assert (out / "samples" / "step_000000002.png").is_file()
    # TensorBoard holds the same scalars as log.jsonl, under train/ and checkpoint/
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in records[0] if key not in ("step", "time")} <= tags
    assert "checkpoint/seconds" in tags and "samples" in events.Tags()["images"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in records], rel=1e-6
    )


def test_the_prefetcher_adds_up_the_time_its_caller_waited():
    """Batches that take 0.1 s each, asked for back to back: every get waits for one."""

    def make(step):
        time.sleep(0.1)
        return [step]

    prefetch = Prefetcher(make, 0, 4)
    try:
        assert [prefetch.get(k) for k in range(4)] == [[0], [1], [2], [3]]
    finally:
        prefetch.close()
    assert prefetch.waited >= 0.8 * 4 * 0.1  # a sleep never ends early; the thread runs 1 ahead


def test_data_wait_shows_when_the_batches_cannot_keep_up(tmp_path, data, monkeypatch):
    """Batches that take 0.2 s to make and a step that takes no time (a stand-in returning a
    finite summary): each logged window is almost all waiting, and the log says so."""
    import selfflow.train.trainer as trainer_module

    make = trainer_module.Trainer._make_batches

    def slow(self, step):
        time.sleep(0.2)
        return make(self, step)

    values = {"loss": 1.0, "flow": 1.0, "rep": 0.0, "grad_norm": 1.0, "stop": 0.0}
    finite = torch.tensor([values[name] for name in SUMMARY_FIELDS], dtype=torch.float64)
    monkeypatch.setattr(trainer_module.Trainer, "_make_batches", slow)
    monkeypatch.setattr(TrainStep, "__call__", lambda self, batches, stop=False: finite.clone())
    train(tiny_config(data, tmp_path / "slow", steps=6, log_every=2, checkpoint_every=100))
    waits = [r["data_wait"] for r in log_records(tmp_path / "slow")]
    assert len(waits) == 3 and all(w > 0.5 for w in waits[1:]), waits


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--data", "--output-dir", "--model", "--hidden-size", "--depth", "--num-heads",
        "--global-batch-size", "--batch-size", "--steps", "--lr", "--ema-decay", "--mask-ratio",
        "--rep-weight", "--label-dropout", "--grad-clip", "--seed", "--device", "--dtype",
        "--checkpoint-every", "--init-from", "--method", "--fsdp", "--keep-last", "--keep-every",
        "--eval-every", "--eval-samples", "--eval-ref", "--sample-every", "--student-layer",
        "--teacher-layer",
    ):  # fmt: skip
        assert option in text, option


@pytest.mark.slow
def test_periodic_evaluation_runs_the_fid_batch_on_the_ema_and_logs_the_metrics(
    tmp_path, tiny_vae_dir, monkeypatch
):

    from selfflow.data import LatentDataset

    # a latent dataset of the tiny VAE's shape and ImageNet's 1000 classes, encoded by that VAE
    data = make_dataset(tmp_path / "latents", n=16, classes=1000)
    real_init = LatentDataset.__init__

    def with_vae(self, root):
        real_init(self, root)
        self.vae = tiny_vae_dir

    monkeypatch.setattr(LatentDataset, "__init__", with_vae)
    from selfflow.eval import evaluator

    seen = {}

    def evaluate(ref_path, sample_path, out_dir=None, inception=None, device=None, batch_size=64):
        with np.load(sample_path) as npz:
            seen[Path(out_dir).name] = npz["arr_0"].shape
        return {"fid": 12.5, "inception_score": 3.0}

    monkeypatch.setattr(evaluator, "evaluate", evaluate)
    monkeypatch.setattr(evaluator, "format_report", lambda metrics: f"FID: {metrics['fid']}")
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"x")
    cache = tmp_path / "cache"  # the FID batch finds the Inception graph here: no download
    cache.mkdir()
    (cache / "classify_image_graph_def.pb").write_bytes(b"graph")
    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    out = tmp_path / "run"
    config = tiny_config(
        data, out, steps=2, eval_every=2, eval_samples=4, eval_ref=str(ref), sample_every=2
    )
    train(config)
    assert seen == {"step_000000002": (4, 16, 16, 3)}  # 4 images decoded by the tiny VAE
    evals = log_records(out, "eval")
    assert evals == [evals[0]] and evals[0]["step"] == 2 and evals[0]["fid"] == 12.5
    assert (out / "samples" / "step_000000002.png").is_file()  # the grid, decoded by the VAE
    assert not (out / "eval" / "step_000000002" / "samples_4.npz").exists()  # scored, removed


def test_export_of_a_given_step_and_of_a_checkpoint_file(tmp_path, reference):
    from selfflow.train.export import export_run

    by_step = export_run(reference, tmp_path / "a.pt", step=2)
    by_file = export_run(run_state.checkpoint_path(reference, 2), tmp_path / "b.pt")
    ema = final_state(reference, 2)["ema"]
    assert by_step.step == by_file.step == 2 and by_file.checkpoint == by_step.checkpoint
    for exported in (by_step, by_file):
        state = load_model(exported.path).state_dict()
        assert all(torch.equal(state[k], ema[k]) for k in state)
    with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
        export_run(reference, tmp_path / "c.pt", step=3)


def test_loop_benchmark_smoke(capsys):
    import importlib.util

    from .helpers import REPO

    spec = importlib.util.spec_from_file_location("train_loop", REPO / "benchmarks/train_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--steps", "3", "--batch", "8"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert table.count("| ") >= 4 and "ms per step" in table
    assert "one step's batch on the host" in table
    assert table.count("one checkpoint (model, EMA, AdamW state, EMA export)") == 1


def test_progress_bar_shows_steps_per_second_images_per_second_and_eta(tmp_path, data, capsys):
    train(tiny_config(data, tmp_path / "run", steps=3, progress=True))
    err = capsys.readouterr().err
    assert "training" in err and "3/3" in err
    assert "step/s" in err or "s/step" in err  # tqdm's rate
    assert "img/s" in err and "<" in err  # images/s and tqdm's elapsed<remaining


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--student-layer", "2", "--teacher-layer", "2"], "teacher layer deeper than the student"),
        (["--global-batch-size", "8", "--batch-size", "3"], "does not divide"),
        (["--method", "flow", "--rep-weight", "0.8"], "--method flow"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--rep-weight", "inf"], "--rep-weight must be a finite number"),
        (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
        (["--ema-decay", "inf"], "--ema-decay must be a finite number"),
        (["--ema-decay", "1"], "--ema-decay must be a finite number in [0.0, 1.0); got 1.0"),
        (["--ema-decay", "-0.1"], "--ema-decay must be a finite number in [0.0, 1.0)"),
    ],
)
def test_bad_options_get_one_clear_line_and_exit_status_1(tmp_path, data, capsys, extra, message):
    args = ["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--steps", "2",
            "--model", "tiny", "--device", "cpu", "--no-progress", *extra]  # fmt: skip
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfflow train: error:") and message in err[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vae_dir) -> Path:
    """A `selfflow prepare` dataset: tiny-VAE posteriors (mean, std) of a small image tree."""
    from selfflow.data.prepare import PrepareConfig, prepare_dataset
    from tests.data.trees import write_tree

    tree = write_tree(tmp_path_factory.mktemp("tree") / "train")
    out = tmp_path_factory.mktemp("prepared") / "latents"
    config = PrepareConfig(
        tree, out, vae=tiny_vae_dir, image_size=16, batch_size=4, shard_size=5, num_workers=0
    )
    prepare_dataset(config, progress=False, log=lambda m: None)
    return out


def test_each_step_draws_a_fresh_posterior_sample_scaled_by_the_vae_factor(prepared):
    from selfflow.data import LatentDataset

    ds = LatentDataset(prepared)
    assert ds.has_std and ds.scale == pytest.approx(0.18215)
    spec_ = StreamSpec(0, 6, tuple(ds.latent_shape), 16, 0.25, 0.0, True)
    draws = draw_step(spec_, DataOrder(0, len(ds)), 2)
    batch = materialise(draws, ds, null_class=ds.num_classes)
    for row, index in enumerate(draws.indices):
        mean, std, label = ds[int(index)]
        expected = 0.18215 * (mean.double() + std.double() * draws.posterior[row].double())
        torch.testing.assert_close(batch.x0[row].double(), expected, rtol=1e-6, atol=1e-7)
        assert int(batch.y[row]) == label  # label dropout 0: every label kept
    other = materialise(draw_step(spec_, DataOrder(0, len(ds)), 3), ds, ds.num_classes)
    assert not torch.equal(other.x0, batch.x0)


def test_a_prepared_dataset_trains_and_its_grid_is_decoded_by_its_vae(tmp_path, prepared):
    out = tmp_path / "run"
    train(tiny_config(prepared, out, steps=2, sample_every=2))
    from PIL import Image

    with Image.open(out / "samples" / "step_000000002.png") as grid:
        # 16 samples of 16 × 16 RGB (the tiny VAE's 8 × 8 latents decoded) in a 4 × 4 grid
        assert grid.mode == "RGB" and grid.size == (4 * 16 + 3 * 2, 4 * 16 + 3 * 2)


def test_a_run_begun_under_other_random_streams_is_not_resumed(tmp_path, data, reference):
    """A run folder whose run.json predates the current streams (no or another
    streams_revision) continues with other numbers, so its resume is refused, naming it."""
    import json
    import shutil

    from selfflow.train.config import STREAMS_REVISION

    run = tmp_path / "old"
    shutil.copytree(reference, run)
    record = json.loads((run / "run.json").read_text())
    assert record["identity"]["streams_revision"] == STREAMS_REVISION
    del record["identity"]["streams_revision"]  # as written before the revision existed
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigurationError, match="streams_revision.*finish it with that version"):
        train(tiny_config(data, run, steps=6))
