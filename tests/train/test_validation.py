"""The validation loss at fixed noise (issue 20): ``--val-data`` and ``--val-every``.

Its numbers are checked against a float64 recomputation written from the definition (keyed
draws per row, ``x_τ = (1 − τ)·x0 + τ·ε``, MSE against ``ε − x0``, cosine of the projected
student block against the EMA's teacher block), on 1 and 2 processes, in TensorBoard, and on
the digits, where a short run must lower it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.base.seeds import keyed_rng
from selfflow.data import LatentDataset, write_dataset
from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.train.trainer import train
from selfflow.train.validation import VAL_TAUS

from .helpers import (
    REPO,
    assert_states_equal,
    cli_args,
    final_state,
    log_records,
    make_dataset,
    subprocess_env,
    tiny_config,
)

TAGS = ("loss", "cos")


def val_dataset(folder: Path, n: int = 48, classes: int = 10, shape=(4, 8, 8), seed=5) -> Path:
    """Other latents than the training data's (another seed), the same shape and classes."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n, *shape)).astype(np.float32)
    stds = rng.uniform(0.1, 0.5, (n, *shape)).astype(np.float32)
    names = [f"c{i}" for i in range(classes)]
    write_dataset(folder, means, np.arange(n) % classes, stds=stds, class_names=names)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return val_dataset(tmp_path_factory.mktemp("val") / "ds", n=40)  # chunks of 32 and 8


@pytest.fixture
def one_thread():
    """Tiny matmuls on a busy 2-core machine: several torch threads slow each other down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def validated(tmp_path_factory, data, held_out) -> Path:
    out = tmp_path_factory.mktemp("validated") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(data, out, steps=2, val_data=str(held_out), val_every=2))
    finally:
        torch.set_num_threads(threads)
    return out


def reference(state: dict, dataset: Path, tau: float) -> dict[str, float]:
    """Loss and cosine at ``tau`` for the online model and the EMA, in float64, from the
    definitions (not the objective's code)."""
    config = ModelConfig.from_dict(state["settings"]["model"])
    settings = state["settings"]["settings"]
    nets = {}
    for name, key in (("online", "model"), ("ema", "ema")):
        net = SelfFlowDiT(config).double()
        net.load_state_dict({k: v.double() for k, v in state[key].items()})
        nets[name] = net.eval()
    ds = LatentDataset(dataset)
    shape = ds.latent_shape
    x0, eps = [], []
    for i in range(len(ds)):
        mean, std, _ = ds[i]
        n = keyed_rng(0, i, "validation/posterior").standard_normal(shape, dtype=np.float32)
        e = keyed_rng(0, i, "validation/noise").standard_normal(shape, dtype=np.float32)
        x0.append(mean.double().numpy() + std.double().numpy() * n)
        eps.append(e)
    x0 = torch.from_numpy(np.stack(x0)).double() * ds.scale
    eps = torch.from_numpy(np.stack(eps)).double()
    y = torch.as_tensor(ds.labels, dtype=torch.int64)
    x_tau = (1 - tau) * x0 + tau * eps
    t = torch.full((len(ds),), tau, dtype=torch.float64)
    out = {}
    with torch.no_grad():
        target = nets["ema"](x_tau, t, y, hidden_layer=settings["teacher_layer"])
        for name, net in nets.items():
            velocity, features = net(x_tau, t, y, project_layer=settings["student_layer"])
            out[f"loss_tau{tau}/{name}"] = float(((velocity - (eps - x0)) ** 2).mean())
            dot = (features * target).sum(-1)
            cos = dot / (features.norm(dim=-1) * target.norm(dim=-1))
            out[f"cos_tau{tau}/{name}"] = float(cos.mean())
    return out


def test_logged_numbers_equal_a_float64_recomputation(validated, held_out):
    records = {r["step"]: r for r in log_records(validated, "val")}
    assert sorted(records) == [0, 2]  # a new run starts its curves at step 0
    record = records[2]
    assert record["rows"] == 40
    expected = reference(final_state(validated, 2), held_out, 0.5)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the EMA is another model than the online one after two steps, and both were trained
    assert record["loss_tau0.5/online"] != record["loss_tau0.5/ema"]


def test_every_tau_and_both_models_reach_tensorboard_under_val(validated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(validated / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = {r["step"]: r for r in log_records(validated, "val")}
    for tau in VAL_TAUS:
        for kind in TAGS:
            for model in ("online", "ema"):
                tag = f"val/{kind}_tau{tau}/{model}"
                assert tag in tags, sorted(tags)
                logged = [(e.step, e.value) for e in events.Scalars(tag)]
                want = [(s, pytest.approx(r[tag[4:]], rel=1e-6)) for s, r in records.items()]
                assert logged == want, tag
    assert {"val/loss_mean/online", "val/cos_mean/ema", "val/seconds"} <= tags


def test_validating_leaves_the_training_as_it_is(tmp_path, data, validated, one_thread):
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=2))
    assert log_records(run, "val") == []  # without --val-every nothing is validated
    # the run above validated at steps 0 and 2 and trained the same weights, bit for bit
    assert_states_equal(final_state(validated, 2), final_state(run, 2))


def test_validation_runs_under_bf16_autocast(tmp_path, data, held_out, one_thread):
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=1, dtype="bfloat16", val_data=str(held_out), val_every=1))
    records = log_records(run, "val")
    assert [r["step"] for r in records] == [0, 1]
    values = [v for r in records for k, v in r.items() if "/" in k]
    assert len(values) == 2 * 2 * 2 * (len(VAL_TAUS) + 1) and all(np.isfinite(values))


def test_a_non_finite_validation_is_said_with_where_to_look(tmp_path, data, one_thread):
    """Held-out shards are size-checked, not hashed: a NaN written into one is logged as NaN,
    and the run says so in a line naming the folder and the command that checks it."""
    folder = val_dataset(tmp_path / "damaged", n=12)
    shard = np.load(LatentDataset(folder).shard_path(0), mmap_mode="r+")  # same size, one NaN
    shard.reshape(-1)[7] = np.nan
    shard.flush()
    del shard
    said: list[str] = []
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=1, val_data=str(folder), val_every=1), log=said.append)
    assert not np.isfinite(log_records(run, "val")[0]["loss_mean/online"])
    warnings = [line for line in said if line.startswith("warning: the validation of step")]
    assert len(warnings) == 2, said  # steps 0 and 1
    assert f"selfflow prepare --verify {folder}" in warnings[0]


def test_a_finite_validation_warns_of_nothing(tmp_path, data, held_out, one_thread):
    said: list[str] = []
    config = tiny_config(data, tmp_path / "run", steps=1, val_data=str(held_out), val_every=1)
    train(config, log=said.append)
    assert len(log_records(tmp_path / "run", "val")) == 2
    assert not [line for line in said if line.startswith("warning")], said


def test_the_dry_run_says_what_validation_costs(tmp_path, data, held_out):
    """One validation's FLOPs against the training FLOPs of the K steps between two: the
    figure docs/training.md works out for XL/2, said for the run at hand before it starts."""
    import re

    from selfflow.train import train_step_flops
    from selfflow.train.config import TrainConfig
    from selfflow.train.validation import validation_flops

    for samples, rows in ((10_000, 40), (16, 16)):  # all 40 held-out rows, or --val-samples
        said: list[str] = []
        config = tiny_config(data, tmp_path / "run", steps=4, val_data=str(held_out), val_every=3)
        train(replace(config, val_samples=samples), dry_run=True, log=said.append)
        line = next(line for line in said if line.startswith("validation: "))
        assert f"validation: {rows} held-out rows × 5 noise levels every 3 steps" in line
        resolved = TrainConfig(**{**config.__dict__, "val_samples": samples}).resolve((4, 8, 8), 10)
        m, st = resolved.model, resolved.settings
        one = validation_flops(m, rows, rep=True, teacher_layer=st.teacher_layer)
        step = train_step_flops(m, teacher_layer=st.teacher_layer, rep_weight=st.rep_weight)
        share = float(re.search(r"each: ([\d.e+-]+) % of", line).group(1))
        assert share == pytest.approx(100 * one / (step * st.global_batch_size * 3), rel=0.05)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_held_out_data_of_another_shape_or_classes_is_refused_by_name(tmp_path, data):
    other_classes = val_dataset(tmp_path / "classes", n=12, classes=12)
    with pytest.raises(ConfigurationError, match=r"classes: 12.*training data: 10"):
        train(tiny_config(data, tmp_path / "a", val_data=str(other_classes), val_every=1))
    other_shape = val_dataset(tmp_path / "shape", n=12, shape=(4, 4, 4))
    with pytest.raises(ConfigurationError, match=r"latent_shape \(4, 4, 4\)"):
        train(tiny_config(data, tmp_path / "b", val_data=str(other_shape), val_every=1))
    with pytest.raises(ConfigurationError, match="--val-every K and --val-data DIR go together"):
        train(tiny_config(data, tmp_path / "c", val_every=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def torchrun(config, nproc: int, *extra: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(REPO / "train.py"), *cli_args(config),
        "--val-data", config.val_data, "--val-every", str(config.val_every), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_one_and_two_processes_log_the_same_numbers(tmp_path, data):
    held_out = val_dataset(tmp_path / "val", n=80)  # chunks of 32, 32, 16: FSDP pads rank 1
    config = tiny_config(data, tmp_path / "one", steps=2, val_data=str(held_out), val_every=2)
    torchrun(config, 1)
    torchrun(replace(config, output_dir=str(tmp_path / "two")), 2)
    torchrun(replace(config, output_dir=str(tmp_path / "fsdp")), 2, "--fsdp")
    one = {r["step"]: r for r in log_records(tmp_path / "one", "val")}
    for other in ("two", "fsdp"):
        found = {r["step"]: r for r in log_records(tmp_path / other, "val")}
        assert sorted(found) == sorted(one) == [0, 2]
        for key, value in one[0].items():  # the same weights: the same numbers, bit for bit
            if key not in ("time", "seconds"):
                assert found[0][key] == value, (other, key)
        for key, value in one[2].items():  # trained on 2 processes: equal up to reordering
            if key not in ("time", "seconds"):
                assert found[2][key] == pytest.approx(value, rel=1e-5), (other, key)


def digits_split(folder: Path, per_class: int = 10) -> tuple[Path, Path]:
    """scikit-learn's digits as a training set and a held-out set of ``per_class`` images of
    each class (the first of each class in file order), as the demo stores them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = digits.target.astype(np.int64)
    held = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
    kept = np.setdiff1d(np.arange(len(labels)), held)
    names = [str(i) for i in range(10)]
    train_dir = write_dataset(folder / "train", images[kept], labels[kept], class_names=names)
    val_dir = write_dataset(folder / "val", images[held], labels[held], class_names=names)
    return train_dir, val_dir


@pytest.mark.slow  # about 30 s on the busy 2-core machine
def test_a_short_digits_run_lowers_the_validation_loss(tmp_path, one_thread):
    from selfflow.train.demo import DemoSettings

    train_dir, val_dir = digits_split(tmp_path)
    demo = DemoSettings()
    config = tiny_config(
        train_dir, tmp_path / "run", steps=80, hidden_size=demo.hidden_size,
        depth=demo.depth, num_heads=demo.num_heads,
        global_batch_size=demo.global_batch_size, lr=demo.lr, ema_decay=demo.ema_decay,
        checkpoint_every=80, log_every=40, val_data=str(val_dir), val_every=40,
    )  # fmt: skip
    train(config)
    records = {r["step"]: r for r in log_records(tmp_path / "run", "val")}
    assert sorted(records) == [0, 40, 80]
    for model in ("online", "ema"):
        curve = [records[s][f"loss_mean/{model}"] for s in (0, 40, 80)]
        assert curve[0] > curve[1] > curve[2], (model, curve)
        for tau in VAL_TAUS:
            assert records[80][f"loss_tau{tau}/{model}"] < records[0][f"loss_tau{tau}/{model}"]
