"""It learns real data on a CPU: the digits demo's samples are recognised as their class."""

from __future__ import annotations

import pytest
import torch

from selfflow.train import demo


@pytest.mark.slow
def test_selfflow_samples_of_each_digit_are_recognised_far_above_chance(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: tiny matmuls, a busy 2-core machine
    try:
        images, labels = demo.write_digits(tmp_path / "data")
        classifier = demo.fit_classifier(images, labels)
        rows = demo.run_method(
            "selfflow", tmp_path / "data", tmp_path, [600], classifier, demo.DemoSettings()
        )
    finally:
        torch.set_num_threads(threads)
    untrained, trained = rows[0]["accuracy"], rows[1]["accuracy"]
    # 200 samples, 20 per class; chance is 10 %
    assert trained >= 0.6, rows
    assert trained >= untrained + 0.3, rows
