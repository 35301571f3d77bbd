"""The representation probe (``selfflow probe``): what it measures and that it cannot cheat.

On the digits: the untrained network (whose blocks start as the identity) reads near chance, a
trained one clearly above; one seed gives one number; the label cannot reach the features
through the conditioning; the torch classifier finds scikit-learn's logistic regression.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from selfflow.base.errors import ConfigurationError
from selfflow.data import LatentDataset, write_dataset
from selfflow.model.card import ModelCard
from selfflow.model.checkpoint import load_model, save_model
from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.research import probe
from selfflow.train import demo
from tests.conftest import randomize_

DIGITS = ModelConfig(
    input_size=8, in_channels=1, hidden_size=64, depth=4, num_heads=4, num_classes=10,
    projector_dim=128,
)  # fmt: skip
DIGIT_NAMES = tuple(str(i) for i in range(10))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one torch thread (on a busy machine, two threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits") / "data"
    demo.write_digits(folder)
    return folder


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """DiT's own initialisation (adaLN-Zero: every block is the identity), saved with a card."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "untrained.pt"
    save_model(SelfFlowDiT(DIGITS), path, card=ModelCard(class_names=DIGIT_NAMES, vae=None))
    return path


def _probe(model, dataset, layers=(2,), taus=(0.3,), seed=0, **kwargs):
    return probe.run_probe(model, dataset, list(layers), list(taus), seed=seed, **kwargs)


# -- what it measures ---------------------------------------------------------------------------


def test_the_untrained_model_reads_near_chance(digits, untrained):
    # identity blocks: a block's token mean is the mean of the patch embedding, a linear
    # function of four averaged pixels; ten classes, chance 10 %
    model, dataset = load_model(untrained), LatentDataset(digits)
    results = _probe(model, dataset, layers=(1, 4), taus=(0.1, 0.3))
    for result in results:
        assert 0.08 <= result.accuracy <= 0.22, result
    # identity blocks: every layer sees the same features
    assert results[0].accuracy == results[2].accuracy and results[1].accuracy == results[3].accuracy


@pytest.mark.slow  # about 40 s on one thread: 300 training steps of the demo's model
def test_a_trained_model_reads_clearly_above_the_untrained_one(digits, untrained, tmp_path):
    from selfflow.train import TrainConfig, train
    from selfflow.train.state import export_path

    settings = demo.DemoSettings()
    config = TrainConfig(
        data=str(digits), output_dir=str(tmp_path / "run"), steps=300, model="tiny",
        hidden_size=settings.hidden_size, depth=settings.depth, num_heads=settings.num_heads,
        global_batch_size=settings.global_batch_size, lr=settings.lr,
        ema_decay=settings.ema_decay, method="flow", seed=0, device="cpu",
        checkpoint_every=300, sample_every=0, log_every=100, progress=False,
    )  # fmt: skip
    train(config, log=lambda _: None)
    trained = load_model(export_path(tmp_path / "run", 300))
    dataset = LatentDataset(digits)
    before = _probe(load_model(untrained), dataset, layers=(2,), taus=(0.3,))[0]
    after = _probe(trained, dataset, layers=(2,), taus=(0.3,))[0]
    # block 2 of the recorded baseline runs read 63.2 to 72.1 % at 300 steps (docs/research.md)
    assert after.accuracy >= 0.5 and after.accuracy >= before.accuracy + 0.3, (before, after)


# -- one seed, one number -----------------------------------------------------------------------


def test_the_same_seed_gives_the_same_number_and_another_seed_another_split(digits):
    model = randomize_(SelfFlowDiT(DIGITS), seed=3, gain=0.5).eval()
    dataset = LatentDataset(digits)
    rows = {"train_rows": np.arange(0, 1797, 3), "test_rows": np.arange(1, 1797, 6)}
    one, two = (_probe(model, dataset, layers=(1, 3), taus=(0.3,), **rows) for _ in range(2))
    assert one == two  # every field: accuracies, the classifier's loss, its iterations
    train_a, test_a = probe.split_rows(len(dataset), 0.2, 0)
    train_b, test_b = probe.split_rows(len(dataset), 0.2, 1)
    assert len(test_a) == len(test_b) == round(0.2 * len(dataset))
    assert not np.array_equal(test_a, test_b)
    assert np.array_equal(np.sort(np.concatenate([train_a, test_a])), np.arange(len(dataset)))


def test_a_rows_features_do_not_depend_on_its_batch(digits):
    """Keyed by the row: the same row in another batch, at another position, gets the same
    noise and so the same features (up to float rounding of the batched matmuls)."""
    model = randomize_(SelfFlowDiT(DIGITS), seed=3, gain=0.5).eval()
    dataset = LatentDataset(digits)
    rows = np.array([5, 17, 400, 1200, 1796])
    alone, _ = probe.probe_features(model, dataset, rows, [2], [0.5], seed=0, batch_size=1)
    mixed_rows = np.array([1796, 3, 400, 9, 5, 1200, 17])
    mixed, _ = probe.probe_features(model, dataset, mixed_rows, [2], [0.5], seed=0, batch_size=7)
    where = [list(mixed_rows).index(r) for r in rows]
    torch.testing.assert_close(mixed[(2, 0.5)][where], alone[(2, 0.5)], atol=1e-5, rtol=1e-5)
    other_seed, _ = probe.probe_features(model, dataset, rows, [2], [0.5], seed=1, batch_size=1)
    assert not torch.allclose(other_seed[(2, 0.5)], alone[(2, 0.5)], atol=1e-3)


# -- the label cannot leak ----------------------------------------------------------------------


def test_the_label_cannot_reach_the_features_through_the_conditioning(digits):
    """A model whose class embeddings are made huge: with the true label its features would
    change beyond recognition; the probe's features do not change at all (it passes the null
    label), while changing the null row itself does change them."""
    model = randomize_(SelfFlowDiT(DIGITS), seed=5, gain=0.5).eval()  # adaLN live: c matters
    dataset = LatentDataset(digits)
    rows = np.arange(0, 1797, 60)
    before, labels = probe.probe_features(model, dataset, rows, [1, 3], [0.4], seed=0)
    table = model.y_embedder.embedding_table.weight
    with torch.no_grad():
        table[: DIGITS.num_classes] *= 1000.0  # every class row; the null row (10) untouched
    after, _ = probe.probe_features(model, dataset, rows, [1, 3], [0.4], seed=0)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the same inputs with the true label: far from the probe's features (the test can fail)
    x0, _ = probe.clean_latents(dataset, rows, 0)
    x = 0.6 * x0 + 0.4 * probe.row_noise(rows, dataset.latent_shape, 0)
    with torch.no_grad():
        leaked = model(x, torch.full((len(rows),), 0.4), labels, hidden_layer=3).mean(dim=1)
    assert (leaked - before[(3, 0.4)]).abs().max() > 1.0
    with torch.no_grad():
        table[DIGITS.null_class] += 1.0
    moved, _ = probe.probe_features(model, dataset, rows, [3], [0.4], seed=0)
    assert not torch.allclose(moved[(3, 0.4)], before[(3, 0.4)], atol=1e-3)


def test_the_probe_sees_the_latents_the_trainer_sees(digits):
    """A latent space with a shift and per-channel statistics (``prepare --latent-norm``): the
    probe's x0 is ``((z − shift) · scale − mean) / std``, written out here in float64."""
    from selfflow.model.latents import LatentConvention

    dataset = LatentDataset(digits)
    channels = dataset.latent_shape[0]
    dataset.latent = LatentConvention(
        channels=channels, factor=None, scaling_factor=0.5, shift_factor=0.25,
        mean=(0.1,) * channels, std=(2.0,) * channels,
    )  # fmt: skip
    rows = np.arange(0, 1797, 97)
    x0, _ = probe.clean_latents(dataset, rows, 0)
    z = torch.as_tensor(dataset.get_batch(rows)[0], dtype=torch.float64)  # digits: no stds
    expected = ((z - 0.25) * 0.5 - 0.1) / 2.0
    torch.testing.assert_close(x0.double(), expected, rtol=1e-6, atol=1e-6)


def test_a_model_reads_the_data_through_the_convention_it_was_trained_on(digits, tmp_path):
    """A model trained with ``--latent-norm channel`` records its training data's statistics
    in its card; held-out data prepared on its own measured other ones. The probe's input is
    the card's ``(z − mean) / std`` (written out here in float64), not the data's."""
    from dataclasses import replace

    from selfflow.model.latents import LatentConvention

    dataset = LatentDataset(digits)
    trained = replace(dataset.latent, mean=(0.3,), std=(2.0,))
    dataset.latent = replace(dataset.latent, mean=(5.0,), std=(7.0,))  # the data's own
    torch.manual_seed(0)
    model = SelfFlowDiT(DIGITS)
    randomize_(model)  # blocks that are not the identity: the input's scale shows
    path = tmp_path / "normed.pt"
    save_model(model, path, card=ModelCard(class_names=DIGIT_NAMES, vae=None, latent=trained))
    model = load_model(path, device="cpu")
    rows = np.arange(0, 1797, 61)
    found, _ = probe.probe_features(model, dataset, rows, [2], [0.4], seed=0)
    z = torch.as_tensor(dataset.get_batch(rows)[0], dtype=torch.float64)  # digits: no stds
    x0 = (z * dataset.latent.scaling_factor - 0.3) / 2.0
    x = 0.6 * x0 + 0.4 * probe.row_noise(rows, dataset.latent_shape, 0).double()
    expected = probe.block_features(model, x.float(), 0.4, [2])[2]
    torch.testing.assert_close(found[(2, 0.4)], expected, rtol=1e-5, atol=1e-5)

    # data of another latent space is refused, naming both (the shape alone cannot tell)
    dataset.latent = LatentConvention(channels=1, factor=None, scaling_factor=0.5)
    with pytest.raises(
        ConfigurationError, match=r"holds latents of 1 channels.*· 0\.5.*trained on"
    ):
        probe.probe_features(model, dataset, rows, [2], [0.4], seed=0)


def test_data_of_another_latent_space_or_encoder_is_refused_before_any_work(
    digits, tmp_path, capsys, monkeypatch
):
    from dataclasses import replace

    dataset = LatentDataset(digits)
    path = tmp_path / "m.pt"
    scaled = replace(dataset.latent, scaling_factor=0.5)  # a model of another latent space
    save_model(SelfFlowDiT(DIGITS), path, card=ModelCard(DIGIT_NAMES, vae=None, latent=scaled))
    err = _refused(["probe", str(path), "--data", str(digits), "--device", "cpu"], capsys,
                   monkeypatch)  # fmt: skip
    assert f"--data {digits} holds latents of 1 channels, no VAE, z · 1" in err
    assert "but the model was trained on 1 channels, no VAE, z · 0.5" in err

    card = ModelCard(DIGIT_NAMES, vae=None, vae_identity="encoder-sha256:" + "a" * 64,
                     latent=dataset.latent)  # fmt: skip
    save_model(SelfFlowDiT(DIGITS), path, card=card)
    model = load_model(path, device="cpu")
    assert probe.model_convention(model, dataset) == dataset.latent  # no digest recorded: ok
    dataset.manifest["vae_identity"] = "encoder-sha256:" + "b" * 64
    with pytest.raises(
        ConfigurationError,
        match=r"encoder encoder-sha256:bbbbbbbbbbbb…, but "
        r"the model was trained on latents of the encoder encoder-sha256:aaaa",
    ):
        probe.model_convention(model, dataset)  # fmt: skip


# -- the classifier -----------------------------------------------------------------------------


def test_the_classifier_finds_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (4, 12))
    labels = rng.integers(0, 4, 400)
    features = centres[labels] + rng.normal(0, 1.5, (400, 12))  # overlapping classes
    standard = (features - features.mean(0)) / features.std(0)
    with threadpool_limits(1, user_api="blas"):
        reference = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(standard, labels)
    fitted = probe.fit_logistic(
        torch.from_numpy(features), torch.from_numpy(labels), 4, c=0.5,
        tolerance=1e-10,
    )  # fmt: skip
    # the same minimiser: scikit-learn's coefficients, bias and predictions
    np.testing.assert_allclose(fitted.weight.numpy().T, reference.coef_, atol=1e-5)
    np.testing.assert_allclose(fitted.bias.numpy(), reference.intercept_, atol=1e-5)
    ours = fitted.predict(torch.from_numpy(features)).numpy()
    assert np.array_equal(ours, reference.predict(standard))
    # its objective, written out: mean cross-entropy + |W|^2 / (2 C n), at scikit-learn's point
    logits = standard @ reference.coef_.T + reference.intercept_
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logp -= logits.max(1, keepdims=True)
    loss = -logp[np.arange(400), labels].mean() + (reference.coef_**2).sum() / (2 * 0.5 * 400)
    assert abs(fitted.loss - loss) < 1e-7 and fitted.loss <= loss + 1e-12  # as low or lower


# -- the command --------------------------------------------------------------------------------


def test_the_command_prints_a_table_and_writes_its_record(digits, untrained, tmp_path, capsys):
    out = tmp_path / "results" / "probe.json"  # in a folder not made yet, as --out may name
    args = ["probe", str(untrained), "--data", str(digits), "--layer", "1", "3", "--tau", "0.2",
            "0.7", "--device", "cpu", "--out", str(out), "--seed", "4"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if line.startswith("| 1 |")]) == 2
    record = json.loads(out.read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(untrained.read_bytes()).hexdigest()
    assert record["split"]["train"] + record["split"]["test"] == 1797
    assert record["split"]["test"] == round(0.2 * 1797) and record["seed"] == 4
    cells = [(r["layer"], r["tau"]) for r in record["results"]]
    assert cells == [(1, 0.2), (1, 0.7), (3, 0.2), (3, 0.7)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in record["results"])
    # the Python API on the same split gives the numbers the command wrote
    train_rows, test_rows = probe.split_rows(1797, 0.2, 4)
    again = _probe(load_model(untrained), LatentDataset(digits), (1,), (0.2,), seed=4,
                   train_rows=train_rows, test_rows=test_rows)[0]  # fmt: skip
    assert again.accuracy == record["results"][0]["accuracy"]
    # one cell: its figures at the top level too
    assert cli.main([*args[:4], "--layer", "2", "--device", "cpu", "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    assert (single["layer"], single["tau"]) == (2, 0.5) and "accuracy" in single


def _refused(args: list[str], capsys, monkeypatch) -> str:
    def no_work(*_args, **_kwargs):
        raise AssertionError("features computed before the request was checked")

    monkeypatch.setattr(probe, "probe_features", no_work)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--layer", "0"], "block number in 1..4"),
        (["--layer", "2", "5"], "block number in 1..4"),
        (["--tau", "0"], "strictly between 0"),
        (["--tau", "0.5", "1.0"], "strictly between 0"),
        (["--test-fraction", "1.0"], "test fraction"),
    ],
)
def test_a_wrong_request_is_one_line_before_any_work(
    digits, untrained, extra, expected, capsys, monkeypatch
):
    args = ["probe", str(untrained), "--data", str(digits), "--device", "cpu", *extra]
    assert expected in _refused(args, capsys, monkeypatch)


def test_a_dataset_that_is_not_the_models_is_refused(
    digits, untrained, tmp_path, capsys, monkeypatch
):
    base = ["probe", str(untrained), "--device", "cpu", "--data"]
    other = tmp_path / "letters"
    write_dataset(
        other, np.zeros((4, 1, 8, 8), np.float32), np.arange(4) % 2, class_names=["a", "b"]
    )
    assert "label 0 is 'a' there and '0' in the model" in _refused(
        [*base, str(other)], capsys, monkeypatch
    )
    wide = tmp_path / "wide"
    write_dataset(
        wide, np.zeros((4, 4, 8, 8), np.float32), np.arange(4) % 2, class_names=["0", "1"]
    )
    assert "shape (4, 8, 8); the model takes (1, 8, 8)" in _refused(
        [*base, str(wide)], capsys, monkeypatch
    )


def test_a_checkpoint_that_does_not_load_strictly_is_refused(
    digits, untrained, tmp_path, capsys, monkeypatch
):
    raw = torch.load(untrained, weights_only=True)
    del raw["state_dict"]["blocks.3.mlp.fc2.bias"]
    broken = tmp_path / "broken.pt"
    torch.save(raw, broken)
    err = _refused(["probe", str(broken), "--data", str(digits), "--device", "cpu"], capsys,
                   monkeypatch)  # fmt: skip
    assert "missing keys (blocks.3.mlp.fc2.bias)" in err


def test_an_out_that_is_a_folder_is_refused_before_any_work(
    digits, untrained, tmp_path, capsys, monkeypatch
):
    # it used to compute every feature, then fail writing with an IsADirectoryError traceback
    runs = tmp_path / "runs"
    runs.mkdir()
    err = _refused(["probe", str(untrained), "--data", str(digits), "--device", "cpu", "--out",
                    str(runs)], capsys, monkeypatch)  # fmt: skip
    assert f"{runs} is a folder" in err and not any(runs.iterdir())


def test_test_data_that_is_the_data_itself_is_refused(
    digits, untrained, tmp_path, capsys, monkeypatch
):
    # scored on its own training rows, it printed a near-perfect accuracy with no warning;
    # a copy of the folder is the same data (same identity) too
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    for test_data in (digits, copy):
        err = _refused(["probe", str(untrained), "--data", str(digits), "--device", "cpu",
                        "--test-data", str(test_data)], capsys, monkeypatch)  # fmt: skip
        assert err.startswith("selfflow probe: error: --test-data is --data itself"), err


def test_a_layer_or_tau_named_twice_is_one_row(untrained, tmp_path, capsys):
    # it printed (and recorded) the same cell twice
    images, labels = demo.write_digits(tmp_path / "all")
    small = tmp_path / "small"
    write_dataset(small, images[:100], labels[:100], class_names=list(DIGIT_NAMES))
    out = tmp_path / "probe.json"
    args = ["probe", str(untrained), "--data", str(small), "--layer", "2", "1", "2", "--tau",
            "0.3", "0.3", "0.7", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines()
            if re.match(r"\| \d", line)]  # fmt: skip
    cells = [(2, 0.3), (2, 0.7), (1, 0.3), (1, 0.7)]  # first-named order, each once
    assert [(int(a), float(b)) for a, b in rows] == cells
    assert [(r["layer"], r["tau"]) for r in json.loads(out.read_text())["results"]] == cells


# -- any process count -----------------------------------------------------------------------


def test_the_shares_of_any_process_count_join_into_the_one_process_features(digits):
    """Each rank computes whole batches of the one-process run (batch j on rank j mod world):
    joined, every count gives the one-process features bit for bit, each row exactly once."""
    model = randomize_(SelfFlowDiT(DIGITS), seed=3, gain=0.5).eval()
    dataset = LatentDataset(digits)
    rows = np.arange(3, 1797, 37)  # 49 rows: 7 batches of 7, split unevenly over 2 or 3 ranks
    common = dict(seed=2, batch_size=7)
    one, labels = probe.probe_features(model, dataset, rows, [1, 3], [0.2, 0.6], **common)
    for world in (2, 3, 4):
        shares = [
            probe.feature_pieces(
                model, dataset, rows, [1, 3], [0.2, 0.6], rank=rank, world_size=world, **common
            )  # fmt: skip
            for rank in range(world)
        ]
        numbers = sorted(number for share in shares for number, _, _ in share)
        assert numbers == list(range(7)), (world, numbers)  # no batch twice, none left out
        assert all(len(share) in (7 // world, -(-7 // world)) for share in shares)
        # the last rank's pieces first: the join orders by batch, not by arrival
        joined, joined_labels = probe.join_pieces([p for share in shares[::-1] for p in share])
        assert torch.equal(joined_labels, labels)
        assert joined.keys() == one.keys()
        for key in one:
            assert torch.equal(joined[key], one[key]), (world, key)
    # the labels are the rows' own (an independent read of the dataset)
    assert torch.equal(labels, LatentDataset(digits).get_batch(rows)[2])
    with pytest.raises(ConfigurationError, match="each once"):
        probe.join_pieces(shares[0])  # rank 0's share alone: batches missing


@pytest.mark.slow  # four to seven torchrun processes start on CPUs: about a minute
@pytest.mark.parametrize(("processes", "batch_size"), [(2, "200"), (3, "256")])
def test_torchrun_writes_the_one_process_record(digits, tmp_path, capsys, processes, batch_size):
    """Under torchrun (gloo on the CPU) only rank 0 prints and writes, and its probe.json is
    the one-process run's: the same split, accuracies and classifier losses, exactly. Two
    processes split 1 438 + 359 rows into batches of 200 (rank 1 has the short ones); with
    three and batches of 256, the third process has no held-out batch at all."""
    import os
    import subprocess
    import sys

    checkpoint = tmp_path / "random.pt"
    model = randomize_(SelfFlowDiT(DIGITS), seed=3, gain=0.5)
    save_model(model, checkpoint, card=ModelCard(class_names=DIGIT_NAMES, vae=None))
    args = ["probe", str(checkpoint), "--data", str(digits), "--layer", "1", "3", "--tau",
            "0.3", "0.7", "--device", "cpu", "--seed", "5", "--batch-size", batch_size,
            "--no-progress", "--out"]  # fmt: skip
    assert cli.main([*args, str(tmp_path / "one.json")]) == 0  # one thread (the fixture)
    printed_one = capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "selfflow.cli", *args,
               str(tmp_path / "many.json")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    many = json.loads((tmp_path / "many.json").read_text())
    assert (one["processes"], many["processes"]) == (1, processes)
    assert many["split"] == one["split"] == {"train": 1438, "test": 359, "test_fraction": 0.2}
    assert len(many["results"]) == 4
    for mine, theirs in zip(many["results"], one["results"], strict=True):
        assert mine == theirs  # accuracy, train accuracy, classifier loss and iterations
    del one["processes"], many["processes"]
    assert many == one
    # rank 0 alone printed: one table, one "wrote", the one-process table's rows
    assert done.stdout.count("| layer | tau |") == 1 and done.stdout.count("wrote") == 1
    table = [line for line in printed_one.splitlines() if line.startswith("| ")]
    assert [line for line in done.stdout.splitlines() if line.startswith("| ")] == table


# -- the pages' tables are the recorded runs ----------------------------------------------------


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table whose header starts with "method | step"."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| method | step |"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip("|").split("|")])
            found.append((header, rows))
    return found


def test_the_probe_tables_of_the_pages_are_the_recorded_runs():
    """docs/research.md's digits table: mean (min–max) over the seeds of the runs in the logs
    it cites, recomputed here from their raw rows; the README's table is a part of it."""
    page = (ROOT / "docs/research.md").read_text()
    section = page.split("## Representation probe", 1)[1].split("\n## ", 1)[0]
    logs = re.findall(r"`(benchmarks/results/[^`]+/digits_probe[^`]*\.log)`", section)
    assert logs, "the probe section cites no record"
    rows = [
        json.loads(line.removeprefix("seed row: "))
        for log in logs
        for line in (ROOT / log).read_text().splitlines()
        if line.startswith("seed row: ")
    ]
    ((header, table),) = _tables(section)
    keys = ["accuracy" if name == "sample accuracy" else name for name in header[3:]]
    assert {"accuracy", "probe L2 tau 0.3"} <= set(keys), header
    shown = {}
    for method, step, seeds, *cells in table:
        group = [row for row in rows if row["method"] == method and row["step"] == int(step)]
        assert sorted(str(row["seed"]) for row in group) == sorted(seeds.split(",")), seeds
        assert len(group) >= 3, (method, step)
        for key, cell in zip(keys, cells, strict=True):
            values = [100 * row[key] for row in group]
            mean, low, high = sum(values) / len(values), min(values), max(values)
            assert cell == f"{mean:.1f} % ({low:.1f}–{high:.1f})", (method, step, key, cell)
            shown[(method, step, key)] = cell
    readme = (ROOT / "README.md").read_text()
    ((small_header, small),) = _tables(readme)
    for method, step, _seeds, *cells in small:
        for name, cell in zip(small_header[3:], cells, strict=True):
            key = "accuracy" if name == "sample accuracy" else name
            assert shown[(method, step, key)] == cell, (method, step, name)
