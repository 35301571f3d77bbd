"""What a researcher watches (issue 23, items 8, 9 and 15): the bar's images/s is log.jsonl's,
a resume keeps its own step in TensorBoard, and TensorBoard files are written without
importing TensorFlow."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfflow.train.events import EventWriter, crc32c, masked_crc32c
from selfflow.train.state import checkpoint_path, export_path
from selfflow.train.trainer import train

from .helpers import REPO, log_records, make_dataset, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` as TensorBoard's own reader sees the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_the_bar_shows_the_images_per_second_that_log_jsonl_records(tmp_path, data, capsys):
    # a checkpoint every step: the step summaries are read in bursts, where a rate measured
    # between two reads came out as tens of thousands of images/s
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=6, log_every=2, checkpoint_every=1, progress=True))
    shown = re.findall(r"([0-9.]+) img/s", capsys.readouterr().err)
    logged = {f"{r['images_per_s']:.1f}" for r in log_records(run)}
    assert shown and set(shown) <= logged, (shown, logged)


def test_a_resume_keeps_the_scalars_of_its_checkpoint_step(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_config(data, run, steps=3, checkpoint_every=2))
    # as if killed after logging step 3 but before its checkpoint: the resume starts at 2
    checkpoint_path(run, 3).unlink()
    export_path(run, 3).unlink(missing_ok=True)
    train(tiny_config(data, run, steps=4, checkpoint_every=2))
    records = log_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    loss = scalars(run, "train/loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4]  # step 2 kept, step 3 once (the new one)
    assert [value for _, value in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    # the first run's checkpoint of step 3 (deleted) is purged; the resume writes step 4's
    assert [step for step, _ in scalars(run, "checkpoint/seconds")] == [2, 4]


def test_training_writes_tensorboard_without_importing_tensorflow(tmp_path, data):
    pytest.importorskip("tensorflow")  # the premise: installed, and torch's writer would load it
    run = tmp_path / "run"
    script = (
        "import sys\n"
        "from tests.train.helpers import tiny_config\n"
        "from selfflow.train.trainer import train\n"
        f"train(tiny_config({str(data)!r}, {str(run)!r}, steps=2))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "oneDNN" not in done.stderr and "TensorFlow" not in done.stderr
    loss = scalars(run, "train/loss")
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log_records(run)]


def test_crc32c_matches_the_standard_check_value_and_tensorboard_s_own():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (
        masked_crc32c as tensorboard_masked,
    )

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for size in (1, 8, 100, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == tensorboard_masked(data)


def test_images_and_purges_read_back_through_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    picture = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    first = EventWriter(tmp_path)
    for step in (1, 2, 3):
        first.add_scalar("a", step * 10.0, step)
    first.add_image("grid", picture, 2)
    first.close()
    resumed = EventWriter(tmp_path, purge_step=3)  # a resume from step 2's checkpoint
    resumed.add_scalar("a", 31.0, 3)
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("a")] == [(1, 10.0), (2, 20.0), (3, 31.0)]
    (image,) = events.Images("grid")
    assert (image.step, image.width, image.height) == (2, 20, 12)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert np.array_equal(decoded, picture)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
